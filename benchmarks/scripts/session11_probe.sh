# Session 11, device call 1: host cost per kernel call (dispatch_probe); where the 1.5B W8A8 prefill's
# host lead goes; the int8-row block's kernels with the optimised HLO that names them.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 200 python3 benchmarks/dispatch_probe.py 2>&1 | grep -v -i warn > $OUT/dispatch_probe.log
cat $OUT/dispatch_probe.log | grep -E "per GEMM|device"
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 40 --dump-hlo 2>&1 | grep -v -i warn > $OUT/profile_step_block_4096.log
head -3 $OUT/profile_step_block_4096.log | cut -c1-200
timeout 230 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 3 --top 5 2>&1 | grep -v -i warn > $OUT/prof1p5_lead.log
grep -A 16 "per call" $OUT/prof1p5_lead.log | cut -c1-160
