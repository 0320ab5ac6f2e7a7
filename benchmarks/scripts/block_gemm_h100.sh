#!/usr/bin/env bash
# One H100 call for the block-scaled Mosaic GEMM (~7 min): the GPU tests that matter most, then the table
# (XLA bf16, Triton block-scaled, Mosaic at G = 128 / 64 / 32 at 8192^3 and the three training layouts of
# hidden 4096 / 2048 / 1024 over 16384 tokens), with ptxas' register / spill report of every Mosaic kernel,
# then the other schedules at G = 64 / 32 on two shapes. Run from the repo root; writes under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
timeout -k 10 -s INT 110 python3 -m pytest --timeout 60 -v --tb=short -n 0 -p no:cacheprovider \
  tests/test_kernels_block_mgpu.py -k "(matches_reference and 1024) or schedules or epilogue or router or narrow or ragged" \
  2>&1 | tee "$OUT/tests.log" | grep -E "PASS|FAIL|ERROR|passed|failed" | tail -40
MOSAIC_GPU_DUMP_PTXAS=1 timeout -k 10 -s INT 250 python3 benchmarks/block_gemm.py --preset full --groups 128 64 32 \
  --triton-groups 128 --variant-groups 128 --json "$OUT/block_gemm_h100.json" \
  --variants '[{"groups_per_step": 2, "schedule": "carry"}, {"pingpong": true}, {"cluster_m": true}]' \
  > "$OUT/block_gemm_h100.log" 2>&1
timeout -k 10 -s INT 60 python3 benchmarks/block_gemm.py --shapes sq8192 h4096_fwd --groups 64 32 --triton-groups 32 \
  --variants '[{"groups_per_step": 2, "schedule": "carry"}, {"pingpong": true}]' \
  --json "$OUT/block_gemm_small_groups_h100.json" > "$OUT/block_gemm_small_groups_h100.log" 2>&1
grep -hvE "^ptxas|^$|Compiling|Function properties|bytes stack|Used" "$OUT/block_gemm_h100.log" \
  "$OUT/block_gemm_small_groups_h100.log" | tail -60
grep -E "registers|spill" "$OUT/block_gemm_h100.log" | sort | uniq -c | head -12
