export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader
(OUT=$OUT/q1 timeout 200 python3 benchmarks/quantize_kernels.py --phases time,sweep --cases "per-row" --shapes 8192x6400,8192x1600 --dtype bfloat16 --samples 7 2>&1 | grep -v Warning | tail -30) > $OUT/quant_perrow.log 2>&1
(OUT=$OUT/q2 timeout 150 python3 benchmarks/quantize_kernels.py --phases time,sweep --cases "LN per-row" --shapes 8192x1600,8192x768 --dtype float32 --samples 7 2>&1 | grep -v Warning | tail -30) > $OUT/quant_ln.log 2>&1
(timeout 200 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies bf16 int8-row --iters 3 --top 25 2>&1 | tail -80) > $OUT/profile_block_int8row.log 2>&1
tail -3 $OUT/*.log
