#!/bin/bash
# Session 15: Jetfire ops, Flax modules and models on the GPU after the cuDNN even-length rule.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 400 python3 -m pytest -q tests/test_jetfire_ops.py tests/test_nn.py tests/test_models.py 2>&1 \
  | tee $OUT/gpu_tests_jetfire_nn_models.log | tail -4
