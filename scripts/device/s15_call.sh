# session 15's #6 call: H100 -> the s14 H100 spec, 3,072 requests; other GPUs -> search there first, 2,560 requests
export NANOFLOW_COMMIT=27efbc8
source scripts/device/setup.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [[ "$GPU" == *H100* ]]; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_rope_kv_gpu.py > $OUT/test_rope_kv_gpu.log 2>&1
  echo "gpu test rc $?"; grep -E "passed|failed|Error|assert" $OUT/test_rope_kv_gpu.log | cut -c1-250 | tail -6
  SPEC=benchmarks/results/2026-12-07-s14-searched-spec-fp8kv-h100-llama3-8b.json KV_DTYPE=fp8 REQS=3072 \
    MODES=overlap-preset BENCH_S=470 bash scripts/device/search_and_bench.sh
else
  KV_DTYPE=fp8 REQS=2560 MODES=overlap-preset SEARCH_S=60 BENCH_S=430 bash scripts/device/search_and_bench.sh
fi
python3 -c "
import json
for r in json.load(open('$OUT/bench6.json')):
    c=r.get('gpu_clocks') or {}
    it=r.get('iterations_timed') or {}
    print(r['mode'], round(r['throughput_tok_s']), round(r['pct_optimal'],2), 'peak', round(r['peak_tflops']), 'wall', round(r['wall_s'],1), 'clk', c.get('sm_mhz'), c.get('temp_c'), c.get('sm_mhz_by_tenth'), c.get('temp_c_by_tenth'), c.get('reasons'), it.get('full_step_ms_median'), it.get('gpu_idle_s'), (r.get('tokens_vs_reference') or {}).get('identical'))
    print('  gemm clocks', (r.get('gemm') or {}).get('gpu_clocks'))
"
