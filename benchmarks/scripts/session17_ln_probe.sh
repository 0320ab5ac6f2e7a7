#!/bin/bash
# Session 17: LayerNorm-quantize probe kernels (affine loads, reduction rounds, cache hints) at prefill sizes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 300 python3 benchmarks/ln_probe.py 2>&1 | tee $OUT/ln_probe.log
