#!/bin/bash
# Session 17: gamma/beta loaded before the row reductions in layer_norm_quantize's one-pass kernel: the probe
# (library configs next to the probe kernels), GPU tests of the producers, the W8A8 prefill at 1.5B and 124M.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 120 python3 benchmarks/ln_probe.py 2>&1 | tee $OUT/ln_probe_preload.log | grep -v "^  {"
timeout 150 python3 -m pytest -q tests/test_kernels_fused_producers.py 2>&1 | tee $OUT/gpu_tests_producers.log \
  | tail -3
for P in gpt2-1.5b gpt2-124m; do
  timeout 200 python3 benchmarks/ptq_speed.py --presets $P --prefill-presets $P --kv-steps 0 --schemes w8a8 \
    --no-xla-rows 2>&1 | tee $OUT/ptq_speed_${P}_prefill_preload.log | grep -A6 "^model"
done
