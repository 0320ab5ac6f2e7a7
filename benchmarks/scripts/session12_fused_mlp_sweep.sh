#!/bin/bash
# Session 12: tiles of the requantizing fc1 and the grouped-A fc2 (Mosaic GPU) at 124M and 1.5B.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 500 python3 benchmarks/fused_mlp.py --sweep 2>&1 | tee $OUT/fused_mlp_sweep.log | grep -v "^    " | tail -5
grep '"ms"' $OUT/fused_mlp_sweep.log | python3 -c "
import json,sys
for l in sys.stdin:
    e=json.loads(l); c=e['config']; print(e['gemm'], c['tile_m'], c['tile_n'], c['wg_dim'], c['stages'], round(e['ms'],4))"
grep -c error $OUT/fused_mlp_sweep.log
