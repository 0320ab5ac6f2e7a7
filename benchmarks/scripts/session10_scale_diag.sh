# Session 10, device call 8: why bf16 quantize_tiles scales differ from the eager XLA reference on the GPU.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 - <<'PY' 2>&1 | grep -v -i warn | tee $OUT/scale_diag.log
import jax, jax.numpy as jnp, numpy as np
from jq8.quant import QuantSpec, quantize
from pallas_kernels.quantize import quantize_tiles
k1, k2 = jax.random.split(jax.random.key(0))
x = (jax.random.normal(k1, (70, 200)) * jnp.exp(jax.random.normal(k2, (70, 1)))).astype(jnp.bfloat16)
P = QuantSpec.per_row()
g = quantize_tiles(x, P)
r = quantize(x, P)
gs, rs = np.asarray(g.scale).ravel(), np.asarray(r.scale).ravel()
amax = np.abs(np.asarray(x, np.float32)).max(axis=1)
bad = np.nonzero(gs != rs)[0]
print("mismatching rows", len(bad), "of", len(gs))
for i in bad[:6]:
    print(i, "kernel", repr(gs[i]), "ref", repr(rs[i]), "amax*(1/127)", repr(np.float32(amax[i]) * np.float32(1 / 127)),
          "amax/127", repr(np.float32(amax[i]) / np.float32(127)))
print("codes differ", int((np.asarray(g.values) != np.asarray(r.values)).sum()))
rj = jax.jit(lambda x: quantize(x, P))(x)
print("jitted reference scale mismatches", int((np.asarray(rj.scale).ravel() != gs).sum()))
PY
