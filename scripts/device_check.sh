#!/bin/bash
# The prepared device check of the flat-weight path and the sync-free Cayley step (one run, under
# 6 minutes on an H100; everything lands in $OUT).  Before the run, here (the GPU image lacks
# geotorch, cdopt, geoopt, autograd): put their wheels in .whl/ (see results/reference/gpu-h200/
# README.md for the pip download command) and the MNIST .gz files in .mnist/MNIST/raw/; carry
# .whl and .mnist.  Then: bash scripts/device_check.sh
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
fi
export PYTHONPATH=/tmp/site:$PWD
export BENCH_DATA_DIR=$PWD/.mnist BENCH_CACHE_DIR=/tmp/cdb-cache CDBENCH_LOCK_DIR=/tmp/cdb-locks
OUT=${OUT:-results/_scratch/device}; mkdir -p "$OUT"
{ date -u; nvidia-smi -L; python3 -c "import torch,sys;print(sys.version);print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),torch.cuda.get_device_name(0))"; git log --oneline -1 2>/dev/null; } > "$OUT/env.txt" 2>&1
tail -4 "$OUT/env.txt"
echo "== calibration $(date -u +%T)"
timeout 90 python3 scripts/cuda_calibration.py --out "$OUT" --rounds 100 2>&1 | grep -v -E "^(USDT|ERROR):" | tee "$OUT/calibration.log"
echo "== GPU tests $(date -u +%T)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_optim.py tests/test_rnn_flat.py tests/test_rnn_amp.py > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
echo "== perf paired $(date -u +%T)"
timeout 200 python3 -m bench.perf --paired --device cuda --hidden 100 512 --batch 64 256 --methods unconstrained cd cdopt cayley geotorch_expm geotorch_cayley --rounds 100 --out "$OUT/perf-cuda-paired" > "$OUT/perf.log" 2>&1; echo "perf rc=$?"; tail -26 "$OUT/perf.log"
ls -la "$OUT"
