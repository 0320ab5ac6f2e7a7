# Session 10, device call 5: where the device idles in the 1.5B prefill; the 124M prefill.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 220 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 3 --top 12 2>&1 | grep -v -i warn > $OUT/prof1p5_gaps.log
grep -E "==|us x|idle" $OUT/prof1p5_gaps.log | cut -c1-160
timeout 300 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --iters 20 \
  --kv-steps 0 2>&1 | grep -v -i warn > $OUT/ptq_speed_124m_prefill.log
grep -E "^row|==" $OUT/ptq_speed_124m_prefill.log | cut -c1-250
