# Session 11, device call 7: the 124M prefill with parameters as a pytree vs bound (jit_bound), one machine.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
for d in tree bound; do
  timeout 280 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --iters 20 \
    --kv-steps 0 --dispatch $d 2>&1 | grep -v -i warn > $OUT/ptq_speed_124m_prefill_$d.log
  echo "-- $d"; grep -E "^row" $OUT/ptq_speed_124m_prefill_$d.log | cut -c1-120
done
