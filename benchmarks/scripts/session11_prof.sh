# Session 11, device call 6: where the 1.5B prefill's time goes with jit_bound dispatch and the new qkv tiles.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 300 python3 benchmarks/profile_decode.py --preset gpt2-1.5b --tokens 8 1024 --schemes bf16 w8a8 \
  --iters 5 --top 8 2>&1 | grep -v -i warn > $OUT/prof1p5_bound.log
grep -E "==|us x|per call|returns|Pjit|Execute |Prepare|ParseArg" $OUT/prof1p5_bound.log | cut -c1-150
