"""The packing planner (issue 15 item 1) on fake machines and fake CUDA memory probes: the
arithmetic of how many runs go side by side, with how many threads, and the reasons it
prints.  The real probe needs a GPU (none here); only its arithmetic is tested."""

import os
from dataclasses import dataclass

import pytest

from bench.packing import (
    CudaMemory,
    GiB,
    Machine,
    available_memory,
    physical_cores,
    plan_packing,
    process_rss,
)
from bench.pool import REMOVED_ENV, worker_env


@dataclass(frozen=True)
class Run:
    device: str = "cpu"
    threads: int = 1


def cpu(n, threads=1):
    return [Run("cpu", threads)] * n


def cuda(n):
    return [Run("cuda")] * n


def no_probe(cfgs):
    raise AssertionError("the CUDA memory probe must not run here")


def test_cpu_one_single_threaded_run_per_physical_core():
    p = plan_packing(cpu(6), Machine(cores=2, cuda_memory=no_probe))
    assert [(s.device, s.threads) for s in p.slots] == [("cpu", 1), ("cpu", 1)]
    assert p.labels == {"cpu": "cpu 2x1"} and p.label("cpu") == "cpu 2x1" and p.threads("cpu") == 1
    assert p.lines == [
        "cpu: 2 worker processes x 1 torch thread, 6 runs (2 physical cores: one single-threaded run "
        "per core, which trains more samples per second in total than one run with every thread "
        "(docs/perf.md))"
    ]


@pytest.mark.parametrize(
    "runs,cores,threads,kw,label",
    [
        # the threads are the runs' configuration: spare cores never become threads (issue 21)
        (3, 8, 1, {}, "cpu 3x1"),
        (1, 2, 1, {}, "cpu 1x1"),  # one run: one thread, as it has packed or resumed
        (1, 1, 1, {}, "cpu 1x1"),
        (10, 8, 2, {}, "cpu 4x2"),
        (10, 8, 16, {}, "cpu 1x16"),  # more threads than cores: one worker
        (2, 8, 1, {}, "cpu 2x1"),  # never more workers than runs
        (10, 8, 1, {"workers": 3}, "cpu 3x1"),  # --workers: the runs keep their threads
        (10, 2, 1, {"workers": 4}, "cpu 4x1"),  # oversubscription, when asked
    ],
)
def test_cpu_sizes(runs, cores, threads, kw, label):
    p = plan_packing(cpu(runs, threads), Machine(cores=cores), **kw)
    assert p.labels["cpu"] == label
    n, k = map(int, label.split()[1].split("x"))
    assert len(p.slots) == n and all(s.threads == k for s in p.slots)
    assert len(p.lines) == 1


def test_cpu_workers_capped_by_measured_memory():
    m = Machine(cores=16, memory=3 * GiB, worker_memory=GiB // 2 * 3)  # 1.5 GiB per worker
    p = plan_packing(cpu(20), m)
    assert p.labels["cpu"] == "cpu 2x1"
    assert "capped at 2 by memory (3.0 GiB available, 1.50 GiB per worker measured)" in p.lines[0]
    # --workers is the user's call: no cap
    assert plan_packing(cpu(20), m, workers=5).labels["cpu"] == "cpu 5x1"


def fake_gpus(n, free, run_peak, context, total=80 * GiB):
    calls = []

    def probe(cfgs):
        calls.append(len(cfgs))
        return [CudaMemory(free=f, total=total, run_peak=run_peak, context=context) for f in free]

    return probe, calls


def test_cuda_auto_packs_as_many_runs_as_the_measured_memory_allows():
    probe, calls = fake_gpus(2, free=[40 * GiB, 30 * GiB], run_peak=3 * GiB, context=GiB // 2)
    p = plan_packing(cuda(40), Machine(cores=32, gpus=2, cuda_memory=probe))
    # the fuller GPU decides: 30 GiB / 3.5 GiB = 8 runs per GPU (cores: 16 per GPU, no cap)
    assert calls == [40]
    assert p.labels == {"cuda": "cuda 8x1"}
    assert [s.device for s in p.slots] == ["cuda:0"] * 8 + ["cuda:1"] * 8
    assert p.lines == [
        "cuda: 8 runs per GPU x 2 GPUs, 1 torch thread each (a run needs 3.50 GiB measured (peak reserved "
        "3.00 GiB + CUDA context 0.50 GiB) and the fullest GPU has 30.0 GiB free: room for 8)"
    ]


def test_cuda_auto_caps_by_cores_and_runs_and_never_goes_below_one():
    probe, _ = fake_gpus(1, free=[40 * GiB], run_peak=GiB // 4, context=GiB // 4)  # room for 80
    p = plan_packing(cuda(40), Machine(cores=4, gpus=1, cuda_memory=probe))
    assert p.labels["cuda"] == "cuda 4x1" and "at most 4 per GPU: one CPU core drives each run" in p.lines[0]
    p = plan_packing(cuda(3), Machine(cores=64, gpus=1, cuda_memory=probe))
    assert p.labels["cuda"] == "cuda 3x1" and "3 cuda runs need no more" in p.lines[0]
    p = plan_packing(cuda(5), Machine(cores=64, gpus=2, cuda_memory=probe))  # ceil(5 / 2) = 3
    assert p.labels["cuda"] == "cuda 3x1" and len(p.slots) == 6
    probe, _ = fake_gpus(1, free=[GiB], run_peak=2 * GiB, context=GiB // 2)  # not even one fits
    p = plan_packing(cuda(4), Machine(cores=8, gpus=1, cuda_memory=probe))
    assert p.labels["cuda"] == "cuda 1x1" and "less than one run fits" in p.lines[0]


def test_cuda_explicit_runs_per_gpu_measures_nothing():
    p = plan_packing(cuda(10), Machine(cores=8, gpus=2, cuda_memory=no_probe), runs_per_gpu=3)
    assert p.labels["cuda"] == "cuda 3x1" and len(p.slots) == 6 and "--runs-per-gpu 3" in p.lines[0]
    p = plan_packing(cpu(4), Machine(cores=2, cuda_memory=no_probe), runs_per_gpu=3)
    assert p.lines[-1] == "--runs-per-gpu 3 ignored: no cuda runs to do"


def test_mixed_devices_leave_the_gpu_drivers_their_cores():
    probe, _ = fake_gpus(1, free=[40 * GiB], run_peak=GiB, context=GiB)
    p = plan_packing(cpu(10) + cuda(10), Machine(cores=8, gpus=1, cuda_memory=probe), runs_per_gpu=2)
    assert p.labels == {"cuda": "cuda 2x1", "cpu": "cpu 6x1"}
    assert "6 of 8 physical cores" in p.lines[1]
    p = plan_packing(cpu(10) + cuda(10), Machine(cores=2, gpus=1, cuda_memory=probe), runs_per_gpu=2)
    assert p.labels["cpu"] == "cpu 1x1" and "oversubscribed" in p.lines[1]


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        plan_packing(cuda(1), Machine(cores=2, gpus=0))
    with pytest.raises(ValueError, match="runs_per_gpu must be 'auto' or a positive integer; got 0"):
        plan_packing(cuda(1), Machine(cores=2, gpus=1), runs_per_gpu=0)
    with pytest.raises(ValueError, match="threads and workers must be positive integers; got 0"):
        plan_packing(cpu(1, threads=0), Machine(cores=2))
    assert plan_packing([], Machine(cores=2)).slots == []


def test_machine_facts_of_this_machine():
    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert available_memory() is None or available_memory() > 0
    assert process_rss() is None or process_rss() > 0


def test_worker_environment():
    base = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "8", "HOME": "/h", "PYTHONPATH": "/x"}
    env = worker_env("cpu", 1, base)
    assert not set(REMOVED_ENV) & set(env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["HOME"] == "/h" and "CUDA_VISIBLE_DEVICES" not in env
    root, rest = env["PYTHONPATH"].split(os.pathsep)
    assert rest == "/x" and os.path.isdir(os.path.join(root, "bench"))
    assert worker_env("cuda:1", 2, base)["CUDA_VISIBLE_DEVICES"] == "1"
    # the driver's own CUDA_VISIBLE_DEVICES is honoured: cuda:1 is its second visible device
    assert worker_env("cuda:1", 1, {**base, "CUDA_VISIBLE_DEVICES": "3, 5"})["CUDA_VISIBLE_DEVICES"] == "5"
    assert base["MALLOC_TRIM_THRESHOLD_"] == "65536"  # the driver's environment is left alone


def test_auto_executor_plans_cuda_runs_with_a_fake_probe():
    """What the sweep prints and records for a CUDA plan (no GPU here: fake facts)."""
    from bench.executors import AutoExecutor

    probe, calls = fake_gpus(2, free=[20 * GiB, 20 * GiB], run_peak=GiB, context=GiB)
    ex = AutoExecutor(machine=Machine(cores=16, gpus=2, cuda_memory=probe))
    lines = ex.plan(cuda(12) + cpu(3))
    assert calls == [12]  # only the cuda runs are probed
    assert lines[0].startswith("executor auto: cuda: 6 runs per GPU x 2 GPUs, 1 torch thread each")
    assert lines[1].startswith("executor auto: cpu: 3 worker processes x 1 torch thread, 3 runs (4 of 16")
    assert lines[2].startswith("executor auto: 15 worker processes;")
    d = ex.describe()
    assert d["packing"] == {"cuda": "cuda 6x1", "cpu": "cpu 3x1"} and d["workers"] == 15
    assert d["slots"][:6] == ["cuda:0 x1 threads"] * 6 and d["in_process"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_probe_on_a_real_device():
    """Written without a GPU and never run here: the probe's numbers are plausible."""
    import torch

    from bench.packing import probe_cuda_memory_in_child
    from bench.runner import RunConfig

    cfgs = [
        RunConfig("lstm", task="digits", device="cuda"),
        RunConfig("cd", task="digits", device="cuda", penalty_param=0.5),
    ]
    mems = probe_cuda_memory_in_child(cfgs, None)
    assert len(mems) == torch.cuda.device_count()
    for m in mems:
        assert 0 < m.run_peak < m.total and 0 < m.context < m.total and 0 < m.free <= m.total


def test_dispatch_order_groups_runs_by_their_data():
    """A worker keeps the last task's data: runs sharing data go out together, in plan order."""
    from bench.pool import dispatch_order
    from bench.runner import RunConfig

    a = [RunConfig("lstm", task="digits", seed=s) for s in range(3)]
    b = [RunConfig("cd", task="smnist", train_subset=100, seed=s) for s in range(2)]
    c = [RunConfig("cd", task="smnist", train_subset=200)]
    plan = [b[0], a[0], c[0], a[1], b[1], a[2]]
    assert dispatch_order(plan) == [b[0], b[1], a[0], a[1], a[2], c[0]]
