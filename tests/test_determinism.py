"""A run's numbers are a function of its configuration alone (issue 21 items 1, 6, 7).

* Its torch threads are part of its configuration (``RunConfig.threads``): every executor runs
  it with them, so ``local``, ``auto`` (worker processes), ``dask`` and a sweep killed and
  resumed write bit-identical metric columns for the same command.  On a CPU whose kernels are
  not thread-count invariant (oneDNN capped to AVX2: ``ONEDNN_MAX_CPU_ISA=AVX2``, as on the
  reporter's AVX2-only EPYC) the local executor's old "every core" differed from the packed
  runs' one thread around the 7th significant digit.
* A given ``--log-every`` / ``--eval-every`` / ``--target`` equal to the automatic value plans
  the same run_id; statistics count each seed of a configuration once.
* A failed row carries the resolved configuration of an ok row, so it counts in its
  configuration.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import ablate, plot, stats
from bench.runner import MEASURED_COLUMNS, PROVENANCE_COLUMNS, TIMED_COLUMNS, RunConfig, run_one

ROOT = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "hooks"
TINY = ["--task", "digits", "--profile", "smoke", "--no-progress", "--no-plots", "--epochs", "2"]
GRID = [*TINY, "--methods", "unconstrained", "cd", "--penalty", "0.1", "0.5"]
#: columns that hold times, memory or how the run was scheduled: everything else must match
NOT_COMPARED = {
    *PROVENANCE_COLUMNS,
    *TIMED_COLUMNS,
    "train_s",
    "wall_s",
    "seconds_to_target",
    "resumed_from_epoch",
}
HISTORY_NOT_COMPARED = {"train_wall_s", "epoch_s"}


@pytest.fixture(autouse=True)
def _private_gate(tmp_path, monkeypatch):
    monkeypatch.setenv("CDBENCH_LOCK_DIR", str(tmp_path / "locks"))


def _cfg(**kw) -> RunConfig:
    base = dict(method="cd", task="digits", profile="smoke", penalty_param=0.5, num_layers=1, hidden_size=8)
    return RunConfig(
        **{**base, "bidirectional": False, "epochs": 1, "train_subset": 64, "perf_iters": 1, **kw}
    )


def test_run_one_trains_with_the_configured_threads_whatever_the_process_has():
    """The executor's process may have any thread count: the run has its own (and gives the
    caller's back); threads enter run_id only when not the default 1 (old run_ids stay)."""
    torch.set_num_threads(2)
    seen = []
    row, _ = run_one(_cfg(), progress=lambda *a: seen.append(torch.get_num_threads()))
    assert row["status"] == "ok", row["error"]
    assert set(seen) == {1} and row["threads"] == 1 and torch.get_num_threads() == 2
    row, _ = run_one(_cfg(threads=2), progress=lambda *a: seen.append(torch.get_num_threads()))
    assert seen[-1] == 2 and row["threads"] == 2
    assert _cfg(threads=2).run_id != _cfg().run_id
    assert "threads" in stats.CONFIG_COLUMNS and "threads" not in PROVENANCE_COLUMNS


def test_old_rows_keep_the_thread_count_they_recorded(tmp_path, capsys):
    """A row written when ``threads`` was provenance keeps its value as its configuration (how it
    trained); a 0.1.0 row (none recorded) stays unknown, never made a 1-thread run; a sweep that
    skips such a row says so."""
    from bench.runner import upgrade_row

    assert upgrade_row({"run_id": "x", "method": "lstm", "threads": "2"})["threads"] == "2"
    assert upgrade_row({"run_id": "x", "method": "lstm"}).get("threads") is None
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "--executor", "local", "--train-subset", "64"]
    assert ablate.main([*args, "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    runs["threads"] = 2  # as the local executor recorded it on 2 cores before
    runs.to_csv(out / "runs.csv", index=False)
    capsys.readouterr()
    assert ablate.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) already ok were trained with 2 torch threads" in printed and "0 to run" in printed
    assert pd.read_csv(out / "runs.csv")["threads"].tolist() == [2]


def test_given_values_equal_to_the_automatic_ones_keep_the_run_id(tmp_path, capsys):
    """Issue 21 item 6: the same command with --log-every / --eval-every / --target set to what
    the first run resolved plans the same run, which resume skips."""
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "--executor", "local", "--train-subset", "128"]
    assert ablate.main([*args, "--out", str(out)]) == 0
    first = pd.read_csv(out / "runs.csv").iloc[0]
    given = ["--log-every", first["log_every"], "--eval-every", first["eval_every"]]
    given += ["--target", first["target_value"]]
    capsys.readouterr()
    assert ablate.main([*args, *map(str, given), "--out", str(out)]) == 0
    assert "(1 already ok, skipped; 0 to run)" in capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["run_id"]) == [first["run_id"]]
    # another value is another configuration
    assert ablate.main([*args, "--log-every", str(int(first["log_every"]) + 1), "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "runs.csv")) == 2


def _row(method, seed, value, run_id, penalty=None, status="ok"):
    return {
        "run_id": run_id,
        "method": method,
        "task": "digits",
        "seed": seed,
        "penalty_param": penalty,
        "log_every": 3,
        "eval_every": 9,
        "threads": 1,
        "status": status,
        "metric": "acc",
        "test_metric": value,
    }


def test_one_seed_recorded_twice_is_counted_once():
    """The issue's scenario: a second command recorded each run again under new run_ids, with
    identical configuration columns; summary.md reported n = 2, a zero-width interval and a
    paired test with p = 0.0, "better than unconstrained"."""
    runs = pd.DataFrame(
        [
            _row("unconstrained", 0, 0.70, "a1"),
            _row("cd", 0, 0.80, "b1", 0.5),
            _row("unconstrained", 0, 0.70, "a2"),
            _row("cd", 0, 0.80, "b2", 0.5),
        ]
    )
    means = stats.stats_table(runs)
    assert (means["n"] == 1).all() and (means["n_runs"] == 1).all()
    assert means["ci_low"].isna().all()
    assert means["note"].str.contains("1 duplicate row\\(s\\) of a seed counted once").all()
    diff = stats.paired_table(runs)
    assert len(diff) == 1 and diff["n"].iloc[0] == 1 and diff["test"].iloc[0] == ""
    assert pd.isna(diff["p_value"].iloc[0]) and diff["verdict"].iloc[0] == "n = 1: no interval, no test"
    assert "2 duplicate row(s)" in diff["note"].iloc[0]  # the method's and the baseline's
    assert stats.ratio_table(runs.assign(train_samples_per_s=100.0))["n"].tolist() == [1, 1]
    # an ok row is kept over a failed one of the same seed; distinct seeds still count
    two = pd.concat([runs, pd.DataFrame([_row("cd", 0, None, "b0", 0.5, "failed")])], ignore_index=True)
    kept = stats.distinct_seeds(two)
    assert sorted(kept["run_id"]) == ["a1", "b1"] and kept["_duplicates"].tolist() == [1, 2]
    three = pd.concat([runs, pd.DataFrame([_row("cd", 1, 0.9, "c1", 0.5)])], ignore_index=True)
    assert stats.stats_table(three).set_index("method").loc["cd", "n"] == 2


def test_a_run_failing_before_training_stays_in_its_configuration(tmp_path, monkeypatch):
    """Issue 21 item 7: a run that fails while its model is built has the resolved columns of an
    ok row: its configuration shows 1/2 ok, no phantom configuration beside it."""
    import bench.runner

    build = bench.runner.build

    def failing(cfg, task):
        if cfg.seed == 1:
            raise RuntimeError("injected at build time")
        return build(cfg, task)

    monkeypatch.setattr(bench.runner, "build", failing)
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "--executor", "local", "--train-subset", "64"]
    assert ablate.main([*args, "--seeds", "0", "1", "--out", str(out)]) == ablate.EXIT_NOT_ALL_OK
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["status"]) == ["failed", "ok"]
    keys = stats.config_columns(runs)
    assert stats.config_id(runs, keys).nunique() == 1, runs[keys].T
    table = plot.results_table(runs, stats.all_stats(runs))
    assert table["ok / runs"].tolist() == ["1/2"]


def test_a_dead_workers_row_has_the_resolved_configuration(tmp_path, monkeypatch):
    """A worker SIGKILLed at its run's start: the driver's row of that run carries the resolved
    columns (log_every, eval_every, seq_len, val_size) and threads of its ok neighbours."""
    notes = tmp_path / "notes"
    notes.mkdir()
    monkeypatch.setenv("CDBENCH_WORKER_HOOK", "pool_hooks:kill_self")
    monkeypatch.setenv("CDBENCH_TEST_DIR", str(notes))
    monkeypatch.setenv("CDBENCH_TEST_AT", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "--train-subset", "64", "--seeds", "0", "1", "2"]
    code = ablate.main([*args, "--executor", "auto", "--workers", "2", "--out", str(out)])
    assert code == ablate.EXIT_NOT_ALL_OK
    runs = pd.read_csv(out / "runs.csv")
    failed, ok = runs[runs["status"] == "failed"], runs[runs["status"] == "ok"]
    assert len(failed) == 1 and len(ok) == 2 and failed["error"].str.contains("died").all()
    cols = ["log_every", "eval_every", "seq_len", "val_size", "threads"]
    assert failed[cols].notna().all().all()
    assert (failed[cols].iloc[0] == ok[cols].iloc[0]).all()
    keys = stats.config_columns(runs)
    assert stats.config_id(runs, keys).nunique() == 1


# ---------------------------------------------------------------------------------------
# The same command under every executor, and killed and resumed


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default: every core
    # oneDNN capped to AVX2: kernels whose results depend on the thread count, as on an AVX2-only CPU
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=os.pathsep.join([str(ROOT), str(HOOKS)]), **extra)
    return env


def _sweep(out: Path, *flags, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.ablate", *GRID, "--seeds", "0", "1", *flags, "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=600)


def _metric_columns(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.read_csv(out / "runs.csv").set_index("run_id").sort_index()
    runs = runs[[c for c in runs.columns if c not in NOT_COMPARED]]
    hist = pd.read_csv(out / "history.csv")
    hist = hist[[c for c in hist.columns if c not in HISTORY_NOT_COMPARED]]
    return runs, hist.sort_values(["run_id", "kind", "step"], kind="stable").reset_index(drop=True)


@pytest.mark.slow(reason="the same 6-run digits sweep five times in fresh interpreters: 1-3 min on 2 cores")
def test_every_executor_and_a_resumed_sweep_write_the_same_metrics(tmp_path):
    runs = {}
    for name, flags in {
        "local": ["--executor", "local"],
        "auto": ["--executor", "auto", "--workers", "2"],
        "dask": ["--executor", "dask", "--workers", "2"],
    }.items():
        p = _sweep(tmp_path / name, *flags)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = _metric_columns(tmp_path / name)
    # killed (SIGKILL of the driver when the 4th run starts, checkpoints on), then resumed
    killed = tmp_path / "killed"
    hooked = _env(
        CDBENCH_WORKER_HOOK="pool_hooks:kill_driver", CDBENCH_TEST_DIR=str(tmp_path), CDBENCH_TEST_AT="3"
    )
    p = _sweep(killed, "--executor", "auto", "--workers", "2", "--checkpoints", env=hooked)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert 2 <= len(pd.read_csv(killed / "runs.csv")) < 6
    p = _sweep(killed, "--executor", "auto", "--checkpoints")  # another packing: as many workers as cores
    assert p.returncode == 0 and "already ok, skipped" in p.stdout, p.stderr[-3000:]
    runs["killed and resumed"] = _metric_columns(killed)

    ref_runs, ref_hist = runs["local"]
    assert len(ref_runs) == 6 and (ref_runs["status"] == "ok").all()
    assert {"test_metric", "train_loss", "feasibility_raw", "confusion", "log_every"} <= set(ref_runs.columns)
    assert set(MEASURED_COLUMNS) - NOT_COMPARED <= set(ref_runs.columns)
    for name, (r, h) in runs.items():
        pd.testing.assert_frame_equal(r, ref_runs, check_exact=True, obj=f"runs.csv of {name}")
        pd.testing.assert_frame_equal(h, ref_hist, check_exact=True, obj=f"history.csv of {name}")
