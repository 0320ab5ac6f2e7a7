#!/usr/bin/env bash
# One H100 call for the block-scaled Mosaic GEMM: the GPU tests that matter most, then the table
# (XLA bf16, Triton block-scaled, Mosaic at G = 128 / 64 / 32 at 8192^3 and the three training layouts of
# hidden 1024 / 2048 / 4096 over 16384 tokens), with ptxas' register / spill report of every Mosaic kernel.
# Run from the repo root; writes under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
timeout -k 10 -s INT 100 python3 -m pytest --timeout 60 -v --tb=short -n 0 -p no:cacheprovider \
  tests/test_kernels_block_mgpu.py -k "(matches_reference and 1024) or carry or epilogue or router or narrow or ragged" \
  2>&1 | tee "$OUT/tests.log" | grep -E "PASS|FAIL|ERROR|passed|failed" | tail -30
MOSAIC_GPU_DUMP_PTXAS=1 timeout -k 10 -s INT 240 python3 benchmarks/block_gemm.py --preset full --groups 128 64 32 \
  --triton-groups 128 --variants '[{"groups_per_step": 2, "schedule": "carry"}, {"pingpong": true}]' \
  --variant-groups 128 --json "$OUT/block_gemm_h100.json" > "$OUT/block_gemm_h100.log" 2>&1
grep -vE "^ptxas|^$" "$OUT/block_gemm_h100.log" | grep -v "Compiling\|Function properties\|bytes stack\|Used" | tail -45
grep -E "registers|spill" "$OUT/block_gemm_h100.log" | sort | uniq -c | head -12
