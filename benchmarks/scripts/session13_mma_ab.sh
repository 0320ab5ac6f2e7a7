#!/bin/bash
# Session 13: A/B of the 3-stage rule (mma_in_flight=0) at the 124M prefill: GEMM variants, then the
# prefill with the rule, then (on this device copy only) without it.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 100 python3 benchmarks/mgpu_gemm.py --variants --gemms 124m_qkv 124m_out 124m_fc1 124m_fc2 2>&1 \
  | tee $OUT/mgpu_gemm_124m_variants.log | grep -v "^  " | tail -5
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  2>&1 | tee $OUT/ptq_speed_124m_prefill_rule.log | grep prefill_ms | cut -c1-60,200-400
sed -i 's/    if cfg.stages < 4:/    if False:/' pallas_kernels/int8_matmul_mgpu.py
grep -c "if False:" pallas_kernels/int8_matmul_mgpu.py
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  2>&1 | tee $OUT/ptq_speed_124m_prefill_norule.log | grep prefill_ms | cut -c1-60,200-400
