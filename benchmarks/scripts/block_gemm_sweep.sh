#!/usr/bin/env bash
# The block-scaled Mosaic GEMM on the H100: ptxas / SASS of a few configs, a schedule sweep, the GPU tests.
# Run from the repo root; writes under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

# ptxas register / spill report and SASS of three small configs (one process: the dump covers every kernel)
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout 60 python3 benchmarks/block_gemm.py --shapes sq512 \
  --groups 128 32 --triton-groups --iters 1 --reps 1 --warmup 0 \
  --variants '[{"groups_per_step": 2, "schedule": "carry"}]' > "$OUT/sass.log" 2>&1
grep -E "registers|spill|stack|Compiling|error" "$OUT/sass.log" | head -60

V='[{"pingpong": true}, {"groups_per_step": 2, "schedule": "pair"}, {"groups_per_step": 2, "schedule": "carry"},
    {"groups_per_step": 2, "schedule": "carry", "pingpong": true}, {"convert": "cvt"}, {"cluster_m": true},
    {"cluster_m": true, "groups_per_step": 2, "schedule": "carry"}]'
timeout 150 python3 benchmarks/block_gemm.py --shapes sq8192 --groups 128 32 --triton-groups 128 \
  --variants "$V" --json "$OUT/sweep_sq8192.json" 2>&1 | tee "$OUT/sweep.log"
timeout 60 python3 benchmarks/block_gemm.py --shapes h4096_fwd --groups 128 --triton-groups \
  --variants '[{"pingpong": true}, {"groups_per_step": 2, "schedule": "carry"}]' \
  --json "$OUT/sweep_h4096.json" 2>&1 | tee -a "$OUT/sweep.log"
timeout -s INT 200 python3 -m pytest --timeout 60 -v --tb=short -n 0 -p no:cacheprovider tests/test_kernels_block_mgpu.py 2>&1 | tee "$OUT/tests.log" | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -60
