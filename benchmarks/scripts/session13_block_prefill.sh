#!/bin/bash
# Session 13: the int8-row block after the producer tiles change (A/B and profile), then the 124M prefill
# (its GEMMs have 3-stage rings, now without a wgmma in flight).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 120 python3 -m pytest -q -x -p no:warnings tests/test_kernels_mgpu.py -k "matches_reference" 2>&1 \
  | tail -3 > $OUT/gpu_tests_mgpu.log
cat $OUT/gpu_tests_mgpu.log
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_final.log | tail -4
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 --top 40 \
  > $OUT/profile_step_block_4096_int8row_final.log 2>&1
head -24 $OUT/profile_step_block_4096_int8row_final.log
timeout 230 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  2>&1 | tee $OUT/ptq_speed_124m_prefill.log | tail -8
