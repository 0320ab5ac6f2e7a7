# Session 11, device call 3: every warpgroup tile shape of the Mosaic GEMM at the 1.5B prefill GEMMs.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 560 python3 benchmarks/mgpu_gemm.py --tiles --gemms 1p5b_qkv 1p5b_out 1p5b_fc1 1p5b_fc2 2>&1 \
  | grep -v -i warn > $OUT/mgpu_gemm_tiles.log
cp $OUT/mgpu_gemm.json $OUT/mgpu_gemm_tiles.json 2>/dev/null; rm -f $OUT/mgpu_gemm.json
grep -E "ms|FAILED" $OUT/mgpu_gemm_tiles.log | sed -e 's/MosaicTileConfig//' | cut -c1-230
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --iters 20 \
  --kv-steps 0 2>&1 | grep -v -i warn > $OUT/ptq_speed_124m_prefill.log
grep -E "^row|==" $OUT/ptq_speed_124m_prefill.log | cut -c1-250
