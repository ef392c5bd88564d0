"""Packed sweeps (issue 15 item 3): the ``auto`` executor's worker processes write the rows
a one-at-a-time sweep writes, keep every run's timing to itself, and resume after a kill
as the local executor does.

Both sides run each run with its configuration's torch threads (``RunConfig.threads``, 1
here), so the metrics must match exactly: the same arithmetic in the same order (every
executor and a resumed sweep: tests/test_determinism.py).

Faults are injected with ``CDBENCH_WORKER_HOOK`` (tests/hooks/pool_hooks.py) at fixed
points of the dispatch order, never by timing; the timing gate's own tests are in
tests/test_gate.py."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from bench import ablate

ROOT = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "hooks"
GRID = [
    "--task",
    "digits",
    "--profile",
    "smoke",
    "--no-progress",
    "--no-plots",
    "--epochs",
    "2",
    "--train-subset",
    "256",
    "--hidden",
    "8",
    "--methods",
    "lstm",
    "cd",
    "cayley",
    "--penalty",
    "0.5",
    "1.0",
]
PACKED = ["--executor", "auto", "--workers", "2", "--threads-per-run", "1"]
#: what packing must not change: every metric and count of a run
SAME = [
    "status",
    "test_metric",
    "test_metric_projected",
    "train_loss",
    "feasibility_raw",
    "feasibility_eff",
    "recurrent_change",
    "reprojections",
    "n_train",
    "n_test",
    "param_count",
    "confusion",
]
HISTORY = ["run_id", "epoch", "step", "train_loss", "test_metric", "feasibility_raw", "feasibility_eff"]


@pytest.fixture(autouse=True)
def _private_gate(tmp_path, monkeypatch):
    """This test's own timing gate (other sweeps on the machine neither wait for it nor
    disturb it), with its trace."""
    monkeypatch.setenv("CDBENCH_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CDBENCH_GATE_TRACE", str(tmp_path / "trace"))


def _runs(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "runs.csv").set_index("run_id").sort_index()


def _history(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv")[HISTORY].sort_values(["run_id", "epoch"]).reset_index(drop=True)


def _same_rows(a: Path, b: Path) -> None:
    ra, rb = _runs(a), _runs(b)
    assert list(ra.index) == list(rb.index) and ra.index.is_unique and rb.index.is_unique
    pd.testing.assert_frame_equal(ra[SAME], rb[SAME], check_exact=True)
    pd.testing.assert_frame_equal(_history(a), _history(b), check_exact=True)


def _check_trace(trace: Path) -> dict[int, list[str]]:
    """Every measurement's lines are contiguous in the trace: no other process passed a step
    boundary (or entered, or left a run) between a run's ``exclusive`` and its ``release``.
    Returns each process's events."""
    lines = [ln.split() for ln in trace.read_text().splitlines()]
    inside = None
    by_pid: dict[int, list[str]] = {}
    for pid, event in lines:
        pid = int(pid)
        by_pid.setdefault(pid, []).append(event)
        if inside is not None:
            assert pid == inside, f"process {pid} did '{event}' while {inside} was timing its steps"
            if event == "release":
                inside = None
        elif event == "exclusive":
            inside = pid
    assert inside is None
    return by_pid


def test_packed_sweep_writes_the_rows_of_a_one_at_a_time_sweep(tmp_path, capsys):
    assert ablate.main([*GRID, *PACKED, "--out", str(tmp_path / "packed")]) == 0
    printed = capsys.readouterr().out
    assert "executor auto: cpu: 2 worker processes x 1 torch thread, 4 runs (--workers 2" in printed
    assert "each run times its throughput holding the machine's timing gate" in printed
    by_pid = _check_trace(tmp_path / "trace")
    (tmp_path / "trace").unlink()
    assert ablate.main([*GRID, "--executor", "local", "--out", str(tmp_path / "local")]) == 0

    _same_rows(tmp_path / "packed", tmp_path / "local")
    packed, local = _runs(tmp_path / "packed"), _runs(tmp_path / "local")
    assert len(packed) == 4 and (packed["status"] == "ok").all()
    assert (packed["executor"] == "pool").all() and (local["executor"] == "local").all()
    assert (packed["packing"] == "cpu 2x1").all() and (local["packing"] == "cpu 1x1").all()
    assert (packed["threads"] == 1).all() and packed["timing_exclusive"].all()
    assert packed["worker"].nunique() == 2 and packed["worker"].str.match(r"pool:\d+:\d+$").all()
    assert (packed["train_samples_per_s"] > 0).all()
    # two worker processes, each timed its runs alone and passed the gate at its steps
    assert len(by_pid) == 2 and os.getpid() not in by_pid
    assert sum(ev.count("exclusive") for ev in by_pid.values()) == 4
    assert all(ev.count("boundary") > 0 for ev in by_pid.values())
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())["executor"]
    assert meta["executor"] == "auto" and meta["packing"] == {"cpu": "cpu 2x1"} and meta["workers"] == 2
    assert meta["plan"][0].startswith("executor auto: cpu: 2 worker processes")
    # the local sweep passes the gate too (one process)
    assert set(_check_trace(tmp_path / "trace")) == {os.getpid()}


def test_one_worker_runs_in_this_process(tmp_path, capsys):
    assert ablate.main([*GRID[:-5], "--methods", "lstm", "--out", str(tmp_path / "o")]) == 0
    assert "one worker, so the runs go one at a time in this process" in capsys.readouterr().out
    runs = _runs(tmp_path / "o")
    assert list(runs["executor"]) == ["local"] and runs["timing_exclusive"].all()
    assert runs["packing"].iloc[0] == f"cpu 1x{runs['threads'].iloc[0]}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--runs-per-gpu", "0"], "runs-per-gpu must be auto or a positive integer; got '0'"),
        (["--runs-per-gpu", "many"], "runs-per-gpu must be auto or a positive integer; got 'many'"),
        (["--runs-per-gpu", "2", "--executor", "local"], "--runs-per-gpu needs --executor auto"),
        (["--threads-per-run", "0"], "threads-per-run must be a positive integer; got '0'"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --executor dask"),
        (["--workers", "2", "--executor", "local"], "--workers needs --executor auto or dask"),
        (["--executor", "pool"], "unknown executor 'pool'; allowed: auto, local, dask"),
    ],
)
def test_bad_packing_flags_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert ablate.main([*GRID, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _hooked(monkeypatch, tmp_path, hook: str, at: int) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    monkeypatch.setenv("CDBENCH_WORKER_HOOK", f"pool_hooks:{hook}")
    monkeypatch.setenv("CDBENCH_TEST_DIR", str(notes))
    monkeypatch.setenv("CDBENCH_TEST_AT", str(at))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    return notes


def test_a_dead_worker_costs_its_run_only(tmp_path, monkeypatch, capsys):
    """A worker SIGKILLed at the start of the 2nd run dispatched: that run is recorded failed
    with the exit status, a fresh worker does the rest; the rerun redoes only that run."""
    notes = _hooked(monkeypatch, tmp_path, "kill_self", 1)
    out = tmp_path / "o"
    assert ablate.main([*GRID, *PACKED, "--out", str(out)]) == ablate.EXIT_NOT_ALL_OK
    victim = next(notes.glob("run-1-*")).name.split("-")[2]
    victim_pid = int((notes / f"run-1-{victim}").read_text())
    runs = _runs(out)
    assert len(runs) == 4 and runs.index.is_unique
    assert runs.loc[victim, "status"] == "failed"
    assert runs.loc[victim, "error"] == f"worker process {victim_pid} died (exit status -{signal.SIGKILL})"
    assert (runs.drop(victim)["status"] == "ok").all()
    assert len(list(notes.glob("worker-*"))) == 3  # two workers, then one in place of the dead one
    capsys.readouterr()
    monkeypatch.delenv("CDBENCH_WORKER_HOOK")
    assert ablate.main([*GRID, *PACKED, "--out", str(out)]) == 0
    assert "3 already ok, skipped; 1 to run" in capsys.readouterr().out
    runs = _runs(out)
    assert len(runs) == 4 and runs.index.is_unique and (runs["status"] == "ok").all()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return False


@pytest.mark.slow(reason="a packed sweep in a fresh interpreter killed by SIGKILL, then resumed: 30-60 s")
def test_killed_packed_sweep_resumes_as_the_local_executor_does(tmp_path, monkeypatch):
    notes = _hooked(monkeypatch, tmp_path, "kill_driver", 3)
    out = tmp_path / "o"
    p = subprocess.run(
        [sys.executable, "-m", "bench.ablate", *GRID, *PACKED, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    workers = [int(f.name.split("-")[1]) for f in notes.glob("worker-*")]
    assert len(workers) == 2
    done = threading.Event()
    for _ in range(6000):  # the workers die with their driver (PR_SET_PDEATHSIG)
        if not any(map(_alive, workers)):
            break
        done.wait(0.01)
    assert not any(map(_alive, workers)), "worker processes outlived their driver"
    # the 4th run dispatched (ordinal 3) comes after >= 2 recorded results, and is not recorded
    partial = _runs(out)
    assert 2 <= len(partial) <= 3 and partial.index.is_unique and (partial["status"] == "ok").all()
    started = {f.name.split("-")[2] for f in notes.glob("run-3-*")}
    assert len(started) == 1 and not started & set(partial.index)
    hist = pd.read_csv(out / "history.csv")  # the history of the recorded runs only, each complete
    assert set(hist["run_id"]) == set(partial.index)
    assert (hist[hist["kind"] == "epoch"].groupby("run_id").size() == 2).all()

    monkeypatch.delenv("CDBENCH_WORKER_HOOK")
    assert ablate.main([*GRID, *PACKED, "--out", str(out)]) == 0
    assert ablate.main([*GRID, "--executor", "local", "--out", str(tmp_path / "local")]) == 0
    _same_rows(out, tmp_path / "local")
    assert (_runs(out)["status"] == "ok").all()


@pytest.mark.slow(reason="two tiny sweeps in fresh interpreters, one of them packed: 20-60 s")
def test_packbench_runs_and_reports_the_ratio(tmp_path):
    """The benchmark itself (not a timed test): both sweeps run, the table has a ratio."""
    p = subprocess.run(  # the digits grid's flags come after the quick grid's: the last flag wins
        [
            sys.executable,
            "-m",
            "bench.packbench",
            "--all-threads",
            "--out",
            str(tmp_path / "pb"),
            "--",
            *GRID,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    table = pd.read_csv(tmp_path / "pb" / "packbench.csv")
    assert sorted(table["mode"]) == ["all-threads", "local", "packed"] and (table["ok"] == 4).all()
    packing = table.set_index("mode")["packing"]
    assert packing["local"] == "cpu 1x1" and packing["packed"].startswith("cpu ")
    md = (tmp_path / "pb" / "packbench.md").read_text()
    assert "Median ratio over 1 repeat(s): **" in md
    # the same configurations on both sides (one thread per run): the same runs, bit for bit
    assert "metric columns identical between one at a time and packed in 1 of 1 repeat(s)" in md
    assert "a different configuration" in md
    command = (tmp_path / "pb" / "command.txt").read_text()
    assert command.startswith("python -m bench.packbench --all-threads --out ")


@pytest.mark.slow(reason="three worker processes that fail to start, each importing torch first: 10-30 s")
def test_workers_that_cannot_start_fail_the_runs_instead_of_looping(tmp_path, monkeypatch):
    """Every worker dies before its first run (here: a hook that cannot be imported): after the
    first replacement also dies, the runs are recorded failed and the sweep ends (exit 3)."""
    monkeypatch.setenv("CDBENCH_WORKER_HOOK", "no_such_module_here:hook")
    out = tmp_path / "o"
    assert ablate.main([*GRID, *PACKED, "--out", str(out)]) == ablate.EXIT_NOT_ALL_OK
    runs = _runs(out)
    assert len(runs) == 4 and (runs["status"] == "failed").all()
    assert runs["error"].str.match(r"worker process \d+ died \(exit status 1\) before its first run$").all()
