#!/bin/bash
# Session 15, device call 2: the Mosaic GEMM's GELU epilogue under each epilogue_math (precise: A&S erf,
# approx: rational erf + rsqrt.approx, tanh: GELU's tanh form), alone and in the whole W8A8 prefill.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 benchmarks/mgpu_gemm.py --gemms 124m_fc1 1p5b_fc1 --math precise approx tanh --gelu-bound \
  2>&1 | tee $OUT/mgpu_gemm_gelu_math3.log | grep "^  \|no_gelu" | cut -c1-40,200-
timeout 100 python3 -m pytest -q tests/test_kernels_mgpu.py -k "epilogue_math or check_config" 2>&1 \
  | tee $OUT/gpu_tests_epilogue_math.log | tail -3
for P in gpt2-1.5b gpt2-124m; do
  timeout 300 python3 benchmarks/ptq_speed.py --presets $P --prefill-presets $P --kv-steps 0 --schemes w8a8 \
    --no-xla-rows --compare-epilogue-math precise approx tanh 2>&1 | tee $OUT/ptq_speed_${P}_gelu_math.log \
    | grep -A6 "^model"
done
