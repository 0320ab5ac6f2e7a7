# Session 10, device call 9: the quantize bit-exactness tests on the GPU, with the GPU tie tolerance.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quantize.py -k "bit_exact" 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -30 > $OUT/gpu_tests_quantize.log
cat $OUT/gpu_tests_quantize.log
