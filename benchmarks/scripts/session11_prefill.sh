# Session 11, device call 5: Mosaic GPU tests (the 256-row qkv tiles), the qkv GEMM's new default,
# the 1.5B prefill with parameters bound as a flat leaf list (jq8.dispatch.jit_bound).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 150 python3 -m pytest -q -x tests/test_kernels_mgpu.py 2>&1 | tail -3 > $OUT/gpu_tests_mgpu.log
cat $OUT/gpu_tests_mgpu.log
timeout 400 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --big-iters 10 \
  --kv-steps 0 2>&1 | grep -v -i warn > $OUT/ptq_speed_1p5b_prefill.log
grep -E "^row|==" $OUT/ptq_speed_1p5b_prefill.log | cut -c1-250
