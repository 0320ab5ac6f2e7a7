# Session 11, device call 2: the host cost of the arguments alone (a trivial call over 1.5B-shaped trees);
# the 1.5B prefill with flat-list parameters, and with XLA command buffers off.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 120 python3 benchmarks/dispatch_probe.py --trees gpt2-1.5b --iters 200 2>&1 | grep -v -i warn \
  > $OUT/dispatch_probe_trees.log
cat $OUT/dispatch_probe_trees.log
timeout 230 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 3 --top 3 --flat 2>&1 | grep -v -i warn > $OUT/prof1p5_lead_flat.log
grep -E "==|per call|returns" $OUT/prof1p5_lead_flat.log | cut -c1-160
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 benchmarks/profile_decode.py \
  --preset gpt2-1.5b --tokens 8 1024 --schemes w8a8 --iters 3 --top 3 2>&1 | grep -v -i warn \
  > $OUT/prof1p5_lead_cmdbuf_off.log
grep -E "==|per call|returns" -A 12 $OUT/prof1p5_lead_cmdbuf_off.log | cut -c1-160
