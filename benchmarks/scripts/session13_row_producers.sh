#!/bin/bash
# Session 13: the int8-row GELU producers over block shapes; the Mosaic GEMM's variants at the Jetfire
# block's shapes (hidden 4096, 16384 tokens).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 benchmarks/row_producers.py 2>&1 | tee $OUT/row_producers.log | tail -12
timeout 330 python3 benchmarks/mgpu_gemm.py --variants --iters 5 --reps 5 --gemms jf_fwd_qkv jf_fwd_fc2 \
  jf_dgrad_qkv jf_dgrad_fc1 jf_dgrad_fc2 jf_wgrad_fc1 jf_wgrad_fc2 2>&1 | tee $OUT/mgpu_gemm_jetfire.log | grep -v "^  " | tail -10
