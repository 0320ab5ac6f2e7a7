#!/bin/bash
# Session 12: the requantizing fc1 / grouped-A fc2 Mosaic kernels: GPU tests, then the MLP chain timings.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 300 python3 -m pytest -q -x tests/test_kernels_mgpu.py -k "requantized or grouped or fc1_codes" 2>&1 | tail -40 > $OUT/gpu_tests_new.log
cat $OUT/gpu_tests_new.log
timeout 300 python3 benchmarks/fused_mlp.py --fc1-tile-m 0 64 2>&1 | tee $OUT/fused_mlp.log | tail -20
