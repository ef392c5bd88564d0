#!/bin/bash
# Issue 16: the device checks, one prepared run. Everything it writes lands in $OUT (one tarball + logs).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD
export BENCH_DATA_DIR=$PWD/.mnist BENCH_CACHE_DIR=/tmp/cdb-cache CDBENCH_LOCK_DIR=/tmp/cdb-locks
W=/tmp/work; mkdir -p $W
{ date -u; nvidia-smi; python3 -c "import torch,sys;print(sys.version);print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),torch.cuda.get_device_name(0))"; nproc; git log --oneline -1 2>/dev/null; } > $W/env.txt 2>&1
cat $W/env.txt | tail -8
echo "== gpu tests $(date -u +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_rnn_amp.py tests/test_packing.py tests/test_training.py -k "cuda or amp or fp16 or bf16 or gpu" > $W/gpu_tests.log 2>&1; echo "tests rc=$?"; tail -3 $W/gpu_tests.log
echo "== perf paired $(date -u +%T)"
timeout 150 python3 -m bench.perf --paired --device cuda --hidden 100 512 --batch 64 256 --methods unconstrained cd cdopt cayley geotorch_expm geotorch_cayley --rounds 100 --out $W/perf-cuda-paired > $W/perf.log 2>&1; echo "perf rc=$?"; tail -12 $W/perf.log
echo "== paper sweep $(date -u +%T)"
timeout 280 python3 -m bench.ablate --profile paper --device cuda --penalty 0.1 0.5 1.0 --seeds 0 1 2 --out $W/smnist-paper-cuda --no-progress --no-plots > $W/sweep.log 2>&1; echo "sweep rc=$?"; grep -E "executor|^\[|done" $W/sweep.log | tail -40
timeout 40 python3 -m bench.plot $W/smnist-paper-cuda > $W/plot.log 2>&1; echo "plot rc=$?"
cd /tmp && tar czf $OUT/gpu_results.tar.gz work && ls -la $OUT
