#!/bin/bash
# Session 15, device call 1: the Mosaic GELU epilogue's two erf forms (and no GELU, the bound) at the prefill
# fc1 shapes; GPU tests of the Mosaic kernel; the int8-row block's profile with its HLO (which XLA fusions).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 benchmarks/mgpu_gemm.py --gemms 124m_fc1 1p5b_fc1 --math precise approx --gelu-bound \
  2>&1 | tee $OUT/mgpu_gemm_gelu_math.log | grep -v "^ "
timeout 150 python3 -m pytest -q -x tests/test_kernels_mgpu.py 2>&1 | tee $OUT/gpu_tests_mgpu.log | tail -3
timeout 200 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 60 --dump-hlo 2>&1 | tee $OUT/profile_step_block_4096_int8row.log | head -70
gzip -f $OUT/*.hlo.txt
