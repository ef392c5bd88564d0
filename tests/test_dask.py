"""Sweeps on a Dask cluster (issue 7): same results as the local executor, a killed
worker costs at most its runs (never loses or duplicates one), a wrong scheduler
address fails fast.  Loopback only; the clusters have two single-threaded workers.

The tests that start a cluster or a fresh interpreter are in the slow tier (``--all``);
the fast tier checks the executor's usage errors and its connect timeout without a
network wait."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("dask.distributed")

from bench import ablate  # noqa: E402
from bench.errors import UsageError  # noqa: E402
from bench.executors import CONNECT_TIMEOUT_S, DaskExecutor, make_executor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--profile", "smoke", "--no-plots", "--no-progress"]
SAME = ["status", "test_metric", "test_metric_projected", "train_loss", "feasibility_raw", "feasibility_eff"]
BAD_ADDRESS = "tcp://127.0.0.1:1"


def _start(args, log: Path, **env) -> subprocess.Popen:
    """``python -m bench.ablate ARGS`` in the background, stdout and stderr to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.ablate", *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _finish(p: subprocess.Popen, log: Path, timeout=240) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"sweep timed out; log:\n{log.read_text()[-3000:]}")


def _runs(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "runs.csv").set_index("run_id").sort_index()


@pytest.mark.slow(reason="a 2-worker LocalCluster and 6 smnist smoke runs: about a minute")
def test_dask_sweep_on_local_cluster_matches_local_executor(tmp_path, mnist_dir):
    grid = [*SMOKE, "--methods", "lstm", "cd", "--penalty", "0.5", "1.0", "--data-dir", mnist_dir]
    dask = _start(
        [*grid, "--executor", "dask", "--workers", "2", "--out", tmp_path / "dask"], tmp_path / "dask.log"
    )
    # meanwhile the local sweep here, in a process with two torch threads: each run has its
    # configuration's one thread (RunConfig.threads) on both executors, so the sums run in the
    # same order (issue 21: the process's count used to be the run's, and feasibility differed)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ablate.main([*grid, "--executor", "local", "--out", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert _finish(dask, tmp_path / "dask.log") == 0, (tmp_path / "dask.log").read_text()[-3000:]

    a, b = _runs(tmp_path / "local"), _runs(tmp_path / "dask")
    assert len(a) == 3 and list(a.index) == list(b.index) and b.index.is_unique
    assert (b["status"] == "ok").all()
    pd.testing.assert_frame_equal(a[SAME], b[SAME], check_exact=False, rtol=0, atol=1e-9)
    assert (b["executor"] == "dask").all() and (a["executor"] == "local").all()
    assert b["worker"].str.startswith("tcp://127.0.0.1:").all()
    assert (b["host"] == socket.gethostname()).all()
    hist_cols = ["run_id", "epoch", "train_loss", "test_metric", "feasibility_raw", "feasibility_eff"]
    ha, hb = (
        pd.read_csv(tmp_path / d / "history.csv")[hist_cols]
        .sort_values(["run_id", "epoch"])
        .reset_index(drop=True)
        for d in ("local", "dask")
    )
    pd.testing.assert_frame_equal(ha, hb, check_exact=False, rtol=0, atol=1e-9)
    meta = json.loads((tmp_path / "dask" / "meta.json").read_text())["executor"]
    assert meta["executor"] == "dask" and meta["workers"] == 2 and meta["local_cluster"] is True
    assert meta["scheduler"].startswith("tcp://127.0.0.1:")


@pytest.fixture(scope="module")
def cluster():
    """A client of a separate 2-worker LocalCluster (what `dask scheduler` + `dask worker` give)."""
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc,
        Client(lc, set_as_default=False) as client,
    ):
        yield client


def _executing(dask_worker):
    return [str(ts.key) for ts in dask_worker.state.executing if str(ts.key).startswith("run-")]


def _kill_a_busy_worker(client, done: threading.Event, killed: list) -> None:
    """SIGKILL the first worker process seen executing a run; note the run's key."""
    while not done.is_set():
        try:
            busy = {addr: keys for addr, keys in client.run(_executing).items() if keys}
            if busy:
                addr, keys = next(iter(busy.items()))
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)
                killed.append(keys[0])
                return
        except Exception:  # noqa: BLE001 - a worker coming or going; try again
            pass
        time.sleep(0.05)


def _sweep_killing_a_worker(client, scheduler: str, out: Path) -> tuple[int, pd.DataFrame, str]:
    """A 4-run sweep (in this process) on ``scheduler`` while a thread kills a busy worker."""
    client.wait_for_workers(2, timeout=120)
    args = [
        "--task",
        "digits",
        *SMOKE,
        "--methods",
        "lstm",
        "cd",
        "cayley",
        "--penalty",
        "0.5",
        "1.0",
        "--epochs",
        "2",
        "--executor",
        "dask",
        "--scheduler",
        scheduler,
        "--out",
        str(out),
    ]
    planned = {c.run_id for c in ablate.make_plan(ablate.build_parser().parse_args(args))[0]}
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, done, killed), daemon=True)
    killer.start()
    try:
        rc = ablate.main(args)
    finally:
        done.set()
        killer.join(timeout=30)
    assert killed, "the sweep ended before a worker could be killed mid-run"
    runs = pd.read_csv(out / "runs.csv")
    assert len(planned) == 4
    assert runs["run_id"].is_unique and set(runs["run_id"]) == planned
    assert runs["status"].isin(["ok", "failed"]).all()
    return rc, runs.set_index("run_id"), killed[0].split("-")[1]


@pytest.mark.slow(reason="kills real worker processes found busy by polling the cluster: 25-40 s")
def test_killed_worker_costs_at_most_its_runs(cluster, tmp_path):
    address = cluster.scheduler.address
    # Dask reschedules a run whose worker died (allowed-failures, default 3): all end ok
    rc, runs, victim = _sweep_killing_a_worker(cluster, address, tmp_path / "retried")
    assert rc == 0 and (runs["status"] == "ok").all(), runs[["status", "error"]]
    meta = json.loads((tmp_path / "retried" / "meta.json").read_text())["executor"]
    assert meta["scheduler"] == address and meta["workers"] == 2 and meta["local_cluster"] is False

    # no second chance (allowed-failures 0): the killed run (and one queued behind it on the
    # same worker, if any) is recorded failed with a one-line error, the others ok; this
    # time through a scheduler file
    def allowed_failures(n=None, dask_scheduler=None):
        old = dask_scheduler.allowed_failures
        if n is not None:
            dask_scheduler.allowed_failures = n
        return old

    old = cluster.run_on_scheduler(allowed_failures, 0)
    try:
        sched_file = tmp_path / "scheduler.json"
        sched_file.write_text(json.dumps({"address": address}))
        rc, runs, victim = _sweep_killing_a_worker(cluster, str(sched_file), tmp_path / "failed")
    finally:
        cluster.run_on_scheduler(allowed_failures, old)
    assert rc == ablate.EXIT_NOT_ALL_OK
    assert runs.loc[victim, "status"] == "failed"
    errors = runs.loc[runs["status"] == "failed", "error"]
    assert errors.str.startswith("KilledWorker: ").all() and not errors.str.contains("\n").any()
    assert (runs["status"] == "ok").sum() >= 2


@pytest.mark.slow(reason="a fresh interpreter importing torch and dask, then the connect timeout: 15-30 s")
def test_wrong_scheduler_address_fails_fast_with_exit_2(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench.ablate",
        "--task",
        "digits",
        *SMOKE,
        "--executor",
        "dask",
        "--scheduler",
        BAD_ADDRESS,
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == ablate.EXIT_BAD_INPUT, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("bench.ablate: error: cannot reach scheduler") and BAD_ADDRESS in lines[0]
    assert not out.exists()


def test_usage_errors_of_dask_executor(tmp_path, capsys, monkeypatch):
    import distributed.comm

    # an unreachable scheduler: the probe is bounded by CONNECT_TIMEOUT_S (recorded, not timed)
    timeouts = []

    async def refused(address, timeout=None, **kw):
        timeouts.append((address, timeout))
        raise OSError(f"Timed out trying to connect to {address} after {timeout} s")

    with monkeypatch.context() as m:
        m.setattr(distributed.comm, "connect", refused)
        with pytest.raises(UsageError, match="cannot reach scheduler 'tcp://127.0.0.1:1'"):
            make_executor("dask", scheduler=BAD_ADDRESS)
    assert timeouts == [(BAD_ADDRESS, CONNECT_TIMEOUT_S)]
    with pytest.raises(UsageError, match="not-an-address"):
        DaskExecutor(scheduler="not-an-address")
    out = tmp_path / "x"
    for extra in ([], ["--workers", "2", "--scheduler", BAD_ADDRESS]):
        rc = ablate.main(["--task", "digits", *SMOKE, "--executor", "dask", "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == ablate.EXIT_BAD_INPUT and len(err) == 1 and "exactly one of --scheduler" in err[0]
    assert not out.exists()


@pytest.mark.slow(reason="starts a 1-worker LocalCluster and uses the 2-worker one: 5-15 s")
def test_worker_settings_that_slow_training(cluster, monkeypatch):
    """The LocalCluster of --workers N starts its workers without the nanny's
    MALLOC_TRIM_THRESHOLD_=65536 and without the statistical profiler (docs/perf.md: both slow
    training), and leaves the driver's environment as it was; a cluster with Dask's defaults
    (the ``cluster`` fixture) gets a warning in the plan."""
    from bench.executors import _profiler_on, _worker_env

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    before = dict(os.environ)
    ex = DaskExecutor(workers=1, threads=2)
    try:
        assert list(ex.client.run(_worker_env, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
        assert list(ex.client.run(_worker_env, "OMP_NUM_THREADS").values()) == ["2"]
        assert list(ex.client.run(_profiler_on).values()) == [False]
        lines = ex.plan([], None)
        assert lines == [
            "dask: one task per run on a LocalCluster started here, 1 workers at the start, "
            "2 torch threads per run"
        ]
    finally:
        ex.close()
    assert dict(os.environ) == before

    assert set(cluster.run(_worker_env, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}  # Dask's default
    ex = DaskExecutor(scheduler=cluster.scheduler.address)
    try:
        warning = ex.plan([], None)[1]
    finally:
        ex.close()
    assert warning.startswith(
        "dask: warning: 2 worker(s) have MALLOC_TRIM_THRESHOLD_ set or the statistical profiler on"
    )
