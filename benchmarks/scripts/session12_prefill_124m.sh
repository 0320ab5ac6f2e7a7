#!/bin/bash
# Session 12: GPU tests of the new Mosaic paths, then the 124M prefill with and without fc1's own codes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 -m pytest -q -x -p no:warnings tests/test_kernels_mgpu.py -k "requantized or grouped or fc1_codes or matches_reference" 2>&1 | tail -5 > $OUT/gpu_tests_mgpu.log
cat $OUT/gpu_tests_mgpu.log
timeout 380 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 --compare-fc1-codes 2>&1 | tee $OUT/ptq_speed_124m_prefill.log | tail -9
