#!/bin/bash
# Session 17: gamma/beta read as (1, N) rows and one row a program on 8 elements a thread in
# layer_norm_quantize: the probe's library rows, GPU tests of the producers and the decode kernels, the W8A8
# prefill at 1.5B and 124M.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 100 python3 benchmarks/ln_probe.py 2>&1 | tee $OUT/ln_probe_lib.log | grep -v "^  {"
timeout 150 python3 -m pytest -q tests/test_kernels_fused_producers.py 2>&1 | tee $OUT/gpu_tests_producers.log \
  | tail -2
for P in ${PRESETS:-gpt2-1.5b gpt2-124m}; do
  timeout 330 python3 benchmarks/ptq_speed.py --presets $P --prefill-presets $P --kv-steps 0 --schemes w8a8 \
    --no-xla-rows 2>&1 | tee $OUT/ptq_speed_${P}_prefill_ln.log | grep -A6 "^model" | cut -c1-25,110-
done
