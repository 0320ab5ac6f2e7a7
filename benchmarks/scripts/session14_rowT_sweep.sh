#!/bin/bash
# Session 14: quantize_tiles per-row + per-row of x.T (the int8-row policy) at GPT-2 124M widths: whole rows
# in each program vs row statistics from the pre-pass, block shapes and warps.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 500 python3 benchmarks/quantize_kernels.py --phases time,sweep --shapes 16384x768,16384x3072 \
  --cases "per-row+T per-row,per-row+T per-row stoch" --samples 5 2>&1 | tee $OUT/quantize_rowT_sweep.log | tail -16
