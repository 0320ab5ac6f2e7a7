#!/bin/bash
# Session 18: fc1's requantizing epilogue no longer waits for its own scale store. GPU tests of the requantized
# and grouped paths, the MLP chain alone at 1.5B (groups 128 and 256), then the 1.5B prefill with fc1's codes
# forced to 256-column groups (--compare-fc1-codes 256), beside the default.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 -m pytest -q -x tests/test_kernels_mgpu.py -k "grouped or requantized or fc1_codes" \
  2>&1 | tee $OUT/gpu_tests_requant.log | tail -2
timeout 120 python3 benchmarks/fused_mlp.py --models 1p5b --group 128 256 2>&1 | tee $OUT/fused_mlp_requant.log \
  | python3 -c "
import sys, json
for l in sys.stdin:
    if l.startswith('1p5b'):
        k, j = l.split(' ', 1); r = json.loads(j)
        print(k, {x: round(v, 4) for x, v in r.items() if isinstance(v, float)})"
timeout 300 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --kv-steps 0 \
  --schemes w8a8 --no-xla-rows --big-iters 20 --compare-fc1-codes 256 2>&1 \
  | tee $OUT/ptq_speed_gpt2-1.5b_prefill_requant.log | grep -A5 "^model" | cut -c1-40,117-
