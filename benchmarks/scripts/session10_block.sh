# Session 10, device call 6: the 1.5B prefill's per-call span vs dispatch; the Jetfire int8-row block.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 200 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 3 --top 5 2>&1 | grep -v -i warn > $OUT/prof1p5_spans.log
grep -E "==|per call|idle" $OUT/prof1p5_spans.log | cut -c1-200
timeout 330 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row \
  --iters 10 2>&1 | grep -v -i warn > $OUT/block_step_4096.log
tail -n 12 $OUT/block_step_4096.log | cut -c1-250
