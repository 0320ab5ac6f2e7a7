#!/bin/bash
# Session 17 (issue 6, nvidia-h200-x2): GPT-2 124M on 1 and 2 GPUs, same global batch (16 x 1024 tokens),
# seed, data order and steps, bf16 and Jetfire INT8 (row scales); the 2-GPU run's step-100 checkpoint then
# resumed on 1 GPU. POLICIES picks the policies (default both).
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a $OUT/gpus.txt
timeout ${LIMIT:-560} python3 benchmarks/dp_scaling.py --config configs/gpt2_124m.py --out /tmp/dp \
  --policies ${POLICIES:-bf16 jetfire-int8} --devices 1 2 --steps=200 --int8_granularity=row \
  --warmup_steps=20 --eval_every=100 --eval_batches=2 --log_every=10 2>&1 | tee $OUT/dp_scaling.log \
  | grep -v "^step\|^\\$" | tail -80
