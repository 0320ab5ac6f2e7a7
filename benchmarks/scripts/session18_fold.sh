#!/bin/bash
# Session 18: LayerNorm affines folded into the next GEMM's weights (quantize_params(fold_norms=True)).
# GPU tests of the folded path, then the 1.5B W8A8 prefill with and without the fold in one run.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest -q -x tests/test_norm_fold.py tests/test_ptq.py -k "fold or fused or fc1_codes" \
  2>&1 | tee $OUT/gpu_tests_fold.log | tail -3
timeout 420 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --kv-steps 0 \
  --schemes w8a8 --no-xla-rows --big-iters 20 --compare-fold 2>&1 | tee $OUT/ptq_speed_gpt2-1.5b_prefill_fold.log \
  | grep -A4 "^model" | cut -c1-32,117-
