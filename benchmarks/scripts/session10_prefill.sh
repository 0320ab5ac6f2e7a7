# Session 10, device call 4: the whole-model prefill after the producer and GEMM pipeline changes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 380 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --big-iters 10 \
  --kv-steps 0 2>&1 | grep -v -i warn > $OUT/ptq_speed_1p5b_prefill.log
grep -E "^row|==" $OUT/ptq_speed_1p5b_prefill.log | cut -c1-250
timeout 200 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 3 --top 12 2>&1 | grep -v -i warn > $OUT/prof1p5.log
grep -E "==|us x" $OUT/prof1p5.log | head -30 | cut -c1-160
