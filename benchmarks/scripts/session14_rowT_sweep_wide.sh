#!/bin/bash
# Session 14: quantize_tiles per-row + per-row of x.T at the hidden-4096 block's shapes (blocks and warps;
# both xla_row_stats_cols settings take the pre-pass route here, so each config is timed twice).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 500 python3 benchmarks/quantize_kernels.py --phases sweep --shapes 16384x4096,16384x12288 \
  --cases "per-row+T per-row,per-row+T per-row stoch" --samples 7 2>&1 | tee $OUT/quantize_rowT_sweep_wide.log | tail -7
