# Session 10, device call 7: compiled-kernel tests touched by this session's changes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quantize.py tests/test_kernels_fused_producers.py \
  "tests/test_ptq.py" -k "row_block or layer_norm or bit_exact or fake_quant_simulation or prefill or fused_pallas" 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -40 > $OUT/gpu_tests_producers.log
cat $OUT/gpu_tests_producers.log
