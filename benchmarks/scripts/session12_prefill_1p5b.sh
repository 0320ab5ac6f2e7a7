#!/bin/bash
# Session 12: GPU tests of the requantizing / grouped Mosaic paths, then the 1.5B prefill (8 x 1024) with
# and without fc1's own codes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 120 python3 -m pytest -q -p no:warnings tests/test_kernels_mgpu.py -k "requantized or grouped or fc1_codes" 2>&1 | tail -5 > $OUT/gpu_tests_mgpu_after_fix.log
cat $OUT/gpu_tests_mgpu_after_fix.log
timeout 470 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --big-iters 10 --kv-steps 0 --compare-fc1-codes 2>&1 | tee $OUT/ptq_speed_1p5b_prefill.log | tail -9
