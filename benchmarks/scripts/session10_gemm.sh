# Session 10, device call 3: Mosaic GEMM pipeline changes: GPU tests, then per-GEMM timings with variants.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 200 python3 -m pytest -q -x tests/test_kernels_mgpu.py 2>&1 | tail -15 > $OUT/gpu_tests_mgpu.log
cat $OUT/gpu_tests_mgpu.log
timeout 300 python3 benchmarks/mgpu_gemm.py --variants --gemms 1p5b_qkv 1p5b_out 1p5b_fc1 1p5b_fc2 124m_out 124m_fc2 2>&1 \
  | grep -v -i warn > $OUT/mgpu_gemm_variants.log
grep -E "^[0-9a-z_]+ \{|FAILED" $OUT/mgpu_gemm_variants.log | cut -c1-400
