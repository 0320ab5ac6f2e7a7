# Session 10, device call 2: producer tiles at prefill sizes; does XLA's command buffer setting move the
# 1.5B W8A8 prefill's wall time?
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
(timeout 260 python3 benchmarks/prefill_producers.py 2>&1 | grep -v -i warn) > $OUT/prefill_producers.log 2>&1
for flags in "" "--xla_gpu_enable_command_buffer="; do
  tag=$( [ -z "$flags" ] && echo default || echo nocmdbuf )
  (XLA_FLAGS="$flags" timeout 150 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 \
     --schemes w8a8 --iters 3 --top 15 2>&1 | grep -v -i warn | tail -30) > $OUT/prof1p5_$tag.log 2>&1
done
tail -n 4 $OUT/*.log
