#!/bin/bash
# Session 15, device call 3: the W8A8 prefill under each GELU epilogue_math, with the jit caches cleared
# between them (call 2's rows all reused one compiled program: int8_matmul is jitted).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for P in gpt2-1.5b gpt2-124m; do
  timeout 280 python3 benchmarks/ptq_speed.py --presets $P --prefill-presets $P --kv-steps 0 --schemes w8a8 \
    --no-xla-rows --compare-epilogue-math precise approx tanh 2>&1 | tee $OUT/ptq_speed_${P}_gelu_math.log \
    | grep -A6 "^model" | cut -c1-25,110-
done
