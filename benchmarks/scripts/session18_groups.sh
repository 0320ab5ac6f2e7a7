#!/bin/bash
# Session 18: fc1's codes in 256-column groups (fc2 takes 256-wide K steps) vs 128 and vs the quantize pass.
# GPU tests of the grouped paths, then the MLP chain alone at both GPT-2 sizes, then a tile sweep at 1.5B.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 -m pytest -q -x tests/test_kernels_mgpu.py -k "grouped or requantized or fc1_codes or fit_config" \
  2>&1 | tee $OUT/gpu_tests_groups.log | tail -3
timeout 150 python3 benchmarks/fused_mlp.py --models 1p5b 124m --group 128 256 2>&1 \
  | tee $OUT/fused_mlp_groups.log | cut -c1-400
cp $OUT/fused_mlp.json $OUT/fused_mlp_groups.json 2>/dev/null
timeout 170 python3 benchmarks/fused_mlp.py --models 1p5b --group 256 --sweep 2>&1 \
  | tee $OUT/fused_mlp_sweep256.log | grep -v "^ " | cut -c1-300
grep '"ms"' $OUT/fused_mlp_sweep256.log | python3 -c "
import sys, json
for l in sys.stdin:
    e = json.loads(l.strip()); c = e['config']
    print(e['gemm'], c['tile_m'], c['tile_n'], c['wg_dim'], c['stages'], e.get('ms'))"
