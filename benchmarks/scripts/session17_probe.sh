#!/bin/bash
# Session 17: where the prefill's LayerNorm-quantize (width 1600, f32 residual) loses to a copy: kernel
# variants, the Triton PTX of the kernel; then end to end at d=4096 on the final session 16 code.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 benchmarks/prefill_producers.py --variants 1600,768 2>&1 | tee $OUT/prefill_variants.log
rm -rf /tmp/dump && mkdir -p /tmp/dump $OUT/ptx
XLA_FLAGS=--xla_dump_to=/tmp/dump timeout 60 python3 -c "
import jax, jax.numpy as jnp
from pallas_kernels.norm_quantize import layer_norm_quantize
from jq8.quant import QuantSpec
x = jax.random.normal(jax.random.key(0), (8192, 1600))
g = jnp.ones((1600,)); b = jnp.zeros((1600,))
jax.block_until_ready(jax.jit(lambda x: layer_norm_quantize(x, g, b, spec=QuantSpec((1, -1)))[0].values)(x))
" 2>&1 | tail -3
ls /tmp/dump | head -30 > $OUT/ptx/listing.txt
for f in $(grep -l "layer_norm_quantize" /tmp/dump/*.ptx 2>/dev/null | head -3); do cp $f $OUT/ptx/; done
grep -c "ld.global" /tmp/dump/*.ptx 2>/dev/null | tee $OUT/ptx/ld_counts.txt | head
timeout 400 python3 benchmarks/loss_parity.py --config configs/gpt_wide.py --out $OUT/parity_wide --steps=60 \
  --policies bf16 jetfire-int8 --int8_granularity=row --warmup_steps=10 --eval_every=30 --eval_batches=2 \
  --log_every=5 --progress=False 2>&1 | tee $OUT/parity_wide_int8row.log | tail -8
