"""End-to-end and reliability tests of the harness (issues 3, 5, 11 and 14).

Sweeps run in this process (``ablate.main``) wherever the process boundary is not what
is tested; the two tests that need a real process (the exit status of ``python -m
bench.ablate`` and a SIGKILL) start one.  Nothing here waits for the machine's speed:
concurrency and kills are driven by hooks and events.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import ablate
from bench.cells import CELLS, INITS, plain_class
from bench.methods import METHODS
from bench.runner import HISTORY_COLUMNS, RUN_COLUMNS, RunConfig, build, get_task, run_one

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = [
    "run_id",
    "method",
    "task",
    "seed",
    "num_layers",
    "hidden_size",
    "bidirectional",
    "granularity",
    "penalty_param",
    "epochs",
    "batch_size",
    "lr",
    "device",
    "status",
    "test_acc",
    "test_acc_projected",
    "train_loss",
    "feasibility_raw",
    "feasibility_eff",
    "recurrent_change",
    "train_samples_per_s",
    "eval_samples_per_s",
    "peak_mem_mb",
    "wall_s",
    "torch_version",
    "git_commit",
]
#: in-process sweeps (the tests patch this process): the local executor, not the default packing
DIGITS = ["--task", "digits", "--profile", "smoke", "--no-progress", "--no-plots", "--executor", "local"]
#: a few seconds per sweep: one epoch on a slice of digits, a tiny model
TINY = [*DIGITS, "--epochs", "1", "--train-subset", "256", "--hidden", "8"]


def cli(*args, check=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "bench.ablate", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        **kw,
    )
    if check is not None:
        assert p.returncode == check, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def sweep(*args) -> int:
    """``python -m bench.ablate ARGS`` in this process; returns the exit status."""
    return ablate.main([str(a) for a in args])


@pytest.mark.slow(reason="10 runs of the smnist smoke profile with plots: 1-2 min on a 2-core CPU")
def test_smoke_sweep_on_real_mnist_end_to_end(mnist_dir, tmp_path):
    out = tmp_path / "sweep"
    p = cli(
        "--penalty",
        "0.1",
        "0.5",
        "1.0",
        "--profile",
        "smoke",
        "--data-dir",
        mnist_dir,
        "--out",
        out,
        "--no-progress",
        check=0,
    )
    assert "plan: 10 runs" in p.stdout
    runs = pd.read_csv(out / "runs.csv")
    assert set(REQUIRED) <= set(runs.columns)
    assert (runs["status"] == "ok").all()
    counts = runs["method"].value_counts().to_dict()
    assert counts == {
        "unconstrained": 1,
        "cd": 3,
        "geotorch_expm": 1,
        "geotorch_cayley": 1,
        "cayley": 1,
        "cdopt": 3,
    }
    assert sorted(runs.loc[runs.method == "cd", "penalty_param"]) == [0.1, 0.5, 1.0]
    assert runs.loc[runs.method == "unconstrained", "penalty_param"].isna().all()
    assert runs["run_id"].is_unique
    assert (runs["n_test"] == 1000).all() and (runs["task"] == "smnist").all()
    assert (runs["test_acc"] > 0.5).all(), runs[["method", "test_acc"]]  # the smoke profile learns
    constrained = runs[runs.method.isin(["geotorch_expm", "geotorch_cayley", "cayley"])]
    assert (constrained["feasibility_raw"] < 1e-4).all()
    cd = runs[runs.method == "cd"]
    assert (cd["feasibility_eff"] < cd["feasibility_raw"]).all()
    assert (runs["train_samples_per_s"] > 0).all() and (runs["peak_mem_mb"] > 0).all()
    hist = pd.read_csv(out / "history.csv")
    assert (hist["kind"] == "epoch").sum() == 2 * len(runs) and set(hist["run_id"]) == set(runs["run_id"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"].startswith("python -m bench.ablate --penalty 0.1 0.5 1.0")
    assert meta["torch_version"] == torch.__version__ and meta["cpu_count"] >= 1
    for png in ["metric_vs_penalty.png", "curves_smnist.png", "throughput.png", "confusion_cd.png"]:
        assert (out / png).stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| cd" in summary and "![throughput.png](throughput.png)" in summary
    # redraw from the CSVs alone
    for png in out.glob("*.png"):
        png.unlink()
    subprocess.run([sys.executable, "-m", "bench.plot", str(out)], cwd=ROOT, check=True, capture_output=True)
    assert (out / "metric_vs_penalty.png").is_file() and (out / "confusion_cdopt.png").is_file()


def test_full_test_set_is_scored(mnist_dir):
    task = get_task(
        RunConfig(method="unconstrained", task="smnist", test_subset=None, val_size=5000), mnist_dir
    )
    assert task.n_test == 10_000 and task.n_train == 55_000 and task.n_val == 5_000
    whole = get_task(RunConfig(method="unconstrained", task="smnist", test_subset=None), mnist_dir)
    assert whole.n_test == 10_000 and whole.n_train == 60_000 and whole.n_val == 0  # val_size 0: 0.1.0's task


BAD = [
    (["--methods", "lstm", "nope"], "unknown method 'nope'; allowed: unconstrained, cd"),
    (["--methods", "nope"], "(lstm: alias of unconstrained)"),
    (["--cell", "lstm", "mlp"], "unknown cell 'mlp'; allowed: lstm, gru, rnn"),
    (["--init", "zeros"], "unknown init 'zeros'; allowed: default, orthogonal, henaff, cayley"),
    (["--optimizer", "sgd"], "unknown optimizer 'sgd'; allowed: adam, rmsprop"),
    (["--nonlinearity", "gelu"], "unknown nonlinearity 'gelu'; allowed: tanh, relu"),
    (["--nonlinearity", "relu"], "--nonlinearity applies to --cell rnn only; got --cell lstm"),
    (
        ["--cell", "gru", "--nonlinearity", "relu"],
        "--nonlinearity applies to --cell rnn only; got --cell gru",
    ),
    (
        ["--cell", "rnn", "--nonlinearity", "tanh", "modrelu", "--layers", "2"],
        "--nonlinearity modrelu is one unidirectional layer (bench.cells.ModReLURNN); got --layers 2; "
        "allowed: --layers 1 --no-bidirectional",
    ),
    (
        ["--cell", "rnn", "--nonlinearity", "modrelu", "--bidirectional"],
        "got --layers 1 and bidirectional; allowed: --layers 1 --no-bidirectional",
    ),
    (["--task", "cifar"], "unknown task 'cifar'; allowed: smnist, digits"),
    (["--profile", "huge"], "unknown profile 'huge'; allowed: smoke, quick, paper, auto"),
    (["--device", "tpu"], "unknown device 'tpu'; allowed: cpu, cuda, auto"),
    (["--granularity", "rows"], "unknown granularity 'rows'; allowed: stacked, per_gate"),
    (["--hidden", "0"], "hidden size must be a positive integer; got '0'"),
    (["--layers", "-1"], "layers must be a positive integer; got '-1'"),
    (["--epochs", "0"], "epochs must be a positive integer; got '0'"),
    (["--batch-size", "2.5"], "batch size must be a positive integer; got '2.5'"),
    (["--lr", "0"], "lr must be a finite number > 0; got '0'"),
    (["--lr", "nan"], "lr must be a finite number > 0; got 'nan'"),
    (["--penalty", "-0.1"], "penalty_param must be a finite number >= 0; got '-0.1'"),
    (["--penalty", "inf"], "penalty_param must be a finite number >= 0; got 'inf'"),
    (["--seeds", "1.5"], "seed must be an integer; got '1.5'"),
    (["--seq-len", "50"], "--seq-len applies to tasks copying, adding only; got --task digits"),
    (["--workers", "2"], "--workers needs --executor auto or dask"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "o"
    code = ablate.main([*DIGITS, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_input_exit_status_of_the_real_process(tmp_path):
    """The process itself exits with 2 and one line on stderr (no usage block, no traceback)."""
    p = cli(*DIGITS, "--hidden", "-3", "--out", tmp_path / "o", check=2)
    assert (
        p.stderr
        == "bench.ablate: error: argument --hidden: hidden size must be a positive integer; got '-3'\n"
    )
    assert not (tmp_path / "o").exists()


def test_list_methods_prints_every_method_with_its_math_and_reference(capsys):
    assert ablate.main(["--list-methods"]) == 0
    out = capsys.readouterr().out
    for m in METHODS.values():
        assert f"{m.name}  (" in out and m.math in out and m.reference in out
    assert "unconstrained  (unconstrained;" in out and "cd  (constrained, uses penalty_param;" in out
    assert "alias lstm" in out  # the old name of unconstrained is still accepted


def test_cuda_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ablate.main([*DIGITS, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "device 'cuda' asked for but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_input_never_touches_existing_results(tmp_path):
    out = tmp_path / "o"
    assert sweep(*TINY, "--methods", "unconstrained", "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert sweep(*TINY, "--methods", "unconstrained", "--hidden", "-3", "--out", out) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_mnist_names_data_dir_and_digits(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def no_network(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    code = ablate.main(
        [
            "--profile",
            "smoke",
            "--methods",
            "unconstrained",
            "--data-dir",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--data-dir" in err and "'digits'" in err and err.count("\n") == 1


def test_resume_skips_ok_runs_and_force_reruns_without_duplicates(tmp_path, capsys):
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "cd", "--penalty", "0.5", "1.0", "--out", out]
    assert sweep(*args) == 0
    first = pd.read_csv(out / "runs.csv")
    capsys.readouterr()
    assert sweep(*args) == 0
    assert "3 already ok, skipped; 0 to run" in capsys.readouterr().out
    assert pd.read_csv(out / "runs.csv").equals(first)
    assert sweep(*args, "--force") == 0
    again = pd.read_csv(out / "runs.csv")
    assert again["run_id"].is_unique and set(again["run_id"]) == set(first["run_id"])
    hist = pd.read_csv(out / "history.csv")
    assert (hist["kind"] == "epoch").sum() == len(again)  # one epoch each
    assert not hist.duplicated(["run_id", "kind", "step"]).any()


#: ``python -c KILL_MID_RUN N ARGS...``: a sweep that SIGKILLs itself in epoch 2 of its N-th run
KILL_MID_RUN = r"""
import os, signal, sys
import bench.executors as ex
n, started, run_one = int(sys.argv[1]), [], ex.run_one

def run_one_killed(cfg, *args, **kw):
    started.append(cfg.run_id)
    if len(started) == n:
        def die(done, total, epoch):
            if epoch == 1 and done == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        kw["progress"] = die
    return run_one(cfg, *args, **kw)

ex.run_one = run_one_killed
from bench.ablate import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_sweep_then_resume_gives_exactly_the_planned_ok_rows(tmp_path):
    out = tmp_path / "o"
    args = [
        *TINY,
        "--methods",
        "unconstrained",
        "cd",
        "cayley",
        "--penalty",
        "0.1",
        "0.5",
        "1.0",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_RUN, "3", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed mid-run, in the middle of the sweep
    partial = pd.read_csv(out / "runs.csv")  # parseable after SIGKILL
    epochs = lambda h: h[h["kind"] == "epoch"]  # noqa: E731
    assert len(partial) == 2 and len(epochs(pd.read_csv(out / "history.csv"))) == 2 * 3
    assert sweep(*args) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    hist = pd.read_csv(out / "history.csv")
    assert len(epochs(hist)) == 10 * 3 and not hist.duplicated(["run_id", "kind", "step"]).any()


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "o"
    args = [*TINY, "--methods", "unconstrained", "--seeds", "0", "1", "--out", out]
    assert sweep(*args) == 0
    with open(out / "runs.csv", "a") as f:
        f.write("deadbeef0000,cd,smnist,0,1")  # a half-written row, no newline
    assert sweep(*args) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and "deadbeef0000" not in set(runs["run_id"])


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        sweep(
            *TINY,
            "--methods",
            "cd",
            "unconstrained",
            "--penalty",
            "0.5",
            "--lr",
            "5e-3",
            "1e12",
            "--out",
            out,
        )
        == 3
    )
    runs = pd.read_csv(out / "runs.csv").set_index(["method", "lr"])
    assert runs.loc[("cd", 1e12), "status"] == "diverged"
    assert runs.loc[("cd", 1e12), "diverged_epoch"] == 1
    assert runs.loc[("cd", 5e-3), "status"] == "ok" and runs.loc[("unconstrained", 5e-3), "status"] == "ok"
    assert "diverged" in capsys.readouterr().out.splitlines()[-1]


def test_failed_run_is_isolated(tmp_path, monkeypatch, capsys):
    import bench.methods as methods

    def broken(lstm, cfg):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(methods.METHODS, "cayley", methods.Method("cayley", "", "", broken))
    out = tmp_path / "o"
    code = ablate.main([*TINY, "--methods", "unconstrained", "cayley", "--out", str(out)])
    assert code == 3
    runs = pd.read_csv(out / "runs.csv").set_index("method")
    assert runs.loc["cayley", "status"] == "failed"
    assert runs.loc["cayley", "error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert runs.loc["unconstrained", "status"] == "ok"
    ablate.main(
        [*TINY, "--methods", "unconstrained", "cayley", "--out", str(out)]
    )  # summary draws the failed run
    from bench import plot

    plot.make_all(out)
    assert "**failed**" in (out / "summary.md").read_text()


def test_second_sweep_on_a_busy_folder_refuses(tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "o"
    assert sweep(*TINY, "--methods", "unconstrained", "--out", out) == 0
    before = (out / "runs.csv").read_bytes()
    capsys.readouterr()
    with FileLock(str(out / ".lock")):
        assert sweep(*TINY, "--methods", "unconstrained", "--seeds", "1", "--out", out) == 2
    err = capsys.readouterr().err
    assert "another sweep is writing to" in err and err.count("\n") == 1
    assert (out / "runs.csv").read_bytes() == before


def test_unwritable_out_folder_is_one_line_and_status_2(tmp_path, capsys):
    """An --out that cannot be a folder (a file in the way, or below a file: the same OSError path
    as a read-only folder, which root could write anyway) exits 2 with one line, no traceback."""
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    for out in (blocker, blocker / "sub"):
        capsys.readouterr()
        assert sweep(*TINY, "--methods", "unconstrained", "--out", out) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bench.ablate: error: --out {out}: cannot create or write")
        assert err.count("\n") == 1
    assert blocker.read_text() == "keep me\n"


def test_force_does_not_resume_a_stale_checkpoint(tmp_path):
    """A checkpoint left by an interrupted --checkpoints run survives a later run without
    --checkpoints; --force --checkpoints then starts afresh instead of resuming it."""
    out = tmp_path / "o"
    args = [
        str(a)
        for a in (*TINY, "--methods", "unconstrained", "--epochs", 2, "--out", out, "--executor", "local")
    ]
    assert sweep(*args) == 0
    (cfg,), _, _ = ablate.make_plan(ablate.build_parser().parse_args(args))

    def stop(done, total, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, checkpoint_dir=out / "checkpoints", progress=stop)
    assert (out / "checkpoints" / f"{cfg.run_id}.pt").is_file()
    assert sweep(*args, "--force", "--checkpoints") == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 and runs["resumed_from_epoch"].isna().all()


def test_two_concurrent_sweeps_one_folder(tmp_path, monkeypatch, capsys):
    """Sweep A is held inside its first run (a hook, not a race) while sweep B starts on the
    same folder: B refuses with exit 2, then A finishes with its files intact."""
    import bench.executors as ex

    out = tmp_path / "o"
    inside, release = threading.Event(), threading.Event()
    run_one_real = ex.run_one

    def held_run_one(*a, **k):
        inside.set()
        assert release.wait(120), "the test never released sweep A"
        return run_one_real(*a, **k)

    monkeypatch.setattr(ex, "run_one", held_run_one)
    result = {}
    a = threading.Thread(
        target=lambda: result.setdefault("a", sweep(*TINY, "--methods", "unconstrained", "--out", out))
    )
    a.start()
    try:
        assert inside.wait(120), "sweep A never started its run"
        assert sweep(*TINY, "--methods", "unconstrained", "--seeds", "1", "--out", out) == 2
        assert "another sweep is writing to" in capsys.readouterr().err
    finally:
        release.set()
        a.join(120)
    assert result["a"] == 0
    runs = pd.read_csv(out / "runs.csv")  # the first sweep's files are intact
    assert len(runs) == 1 and (runs["status"] == "ok").all() and (runs["seed"] == 0).all()


def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second run (a KeyboardInterrupt from the trainer, as SIGINT raises it):
    one line on stderr naming the folder, exit 130, the first run kept; the same command then
    runs only the second."""
    import bench.executors as ex

    out = tmp_path / "o"
    args = (*TINY, "--methods", "unconstrained", "--seeds", 0, 1, "--out", out, "--executor", "local")
    run_one_real, calls = ex.run_one, []

    def interrupted_second(*a, **k):
        calls.append(a[0].seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_one_real(*a, **k)

    monkeypatch.setattr(ex, "run_one", interrupted_second)
    assert sweep(*args) == ablate.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and str(out) in err and "Traceback" not in err
    assert len(pd.read_csv(out / "runs.csv")) == 1
    monkeypatch.setattr(ex, "run_one", run_one_real)
    assert sweep(*args) == 0
    assert "(1 already ok, skipped; 1 to run)" in capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["seed"]) == [0, 1] and (runs["status"] == "ok").all()


def _cfg(**kw):
    base = dict(
        method="cd",
        task="digits",
        num_layers=2,
        hidden_size=8,
        bidirectional=True,
        epochs=2,
        batch_size=64,
        lr=5e-3,
        penalty_param=0.5,
        perf_iters=1,
    )
    return RunConfig(**{**base, **kw})


METRICS = ["test_metric", "test_metric_projected", "train_loss", "feasibility_raw", "feasibility_eff"]


@pytest.mark.parametrize("method", ["cd", "cayley", "geotorch_expm"])
def test_checkpoint_resume_matches_uninterrupted_run(method, tmp_path):
    cfg = _cfg(method=method, epochs=3, penalty_param=0.5 if METHODS[method].uses_penalty else None)
    full, full_hist = run_one(cfg, checkpoint_dir=tmp_path / "a")

    def interrupt(done, total, epoch):
        if epoch == 1 and done == 2:
            raise KeyboardInterrupt  # like Ctrl-C / a killed job, mid-epoch 2

    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, checkpoint_dir=tmp_path / "b", progress=interrupt)
    assert (tmp_path / "b" / f"{cfg.run_id}.pt").is_file()
    resumed, hist = run_one(cfg, checkpoint_dir=tmp_path / "b")
    assert resumed["status"] == "ok" and resumed["resumed_from_epoch"] == 1
    for k in METRICS:
        assert resumed[k] == full[k], k
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in full_hist]
    assert not (tmp_path / "b" / f"{cfg.run_id}.pt").exists()  # removed once the run is ok


def test_same_command_same_metrics():
    for method in ("cd", "cayley", "geotorch_cayley"):
        cfg = _cfg(method=method, penalty_param=0.5 if METHODS[method].uses_penalty else None)
        a, _ = run_one(cfg)
        b, _ = run_one(cfg)
        assert a["status"] == "ok"
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


def test_crafted_checkpoint_is_refused_not_executed_and_the_run_starts_afresh(tmp_path, capsys):
    """A pickle carrying a callable at a run's checkpoint path: torch.load(weights_only=True)
    refuses it (the callable never runs), one line says so, the run starts from epoch 0."""
    cfg = _cfg(method="cd", epochs=2)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):  # unpickling this calls exec(...) unless the loader refuses callables
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    path = ckpt_dir / f"{cfg.run_id}.pt"
    torch.save({"model": Payload(), "optimizer": {}, "epoch": 1, "history": [], "elapsed": 0.0}, path)
    row, hist = run_one(cfg, checkpoint_dir=ckpt_dir)
    err = capsys.readouterr().err
    assert not marker.exists()  # the callable was not executed
    assert row["status"] == "ok" and "resumed_from_epoch" not in row
    assert [h["epoch"] for h in hist if h["kind"] == "epoch"] == [1, 2]
    lines = [ln for ln in err.splitlines() if "refused" in ln]
    assert len(lines) == 1 and str(path) in lines[0] and "starts afresh" in lines[0]
    assert not path.exists()  # overwritten by the run's own checkpoints, removed once it is ok
    fresh, _ = run_one(cfg)
    assert {k: row[k] for k in METRICS} == {k: fresh[k] for k in METRICS}


#: every cell, and the rnn cell's modReLU variant (bench.cells.ModReLURNN: one unidirectional layer)
CELL_VARIANTS = [(c, "tanh") for c in CELLS] + [("rnn", "modrelu")]
_ids = [c if n == "tanh" else f"{c}-{n}" for c, n in CELL_VARIANTS]


def _variant(cell, nonlinearity):
    shape = dict(num_layers=1, bidirectional=False) if nonlinearity == "modrelu" else {}
    return dict(cell=cell, nonlinearity=nonlinearity, **shape)


@pytest.mark.parametrize("cell,nonlinearity", CELL_VARIANTS, ids=_ids)
@pytest.mark.parametrize("init", INITS)
def test_every_method_starts_from_the_same_unconstrained_weights(cell, nonlinearity, init):
    from cdcore import stiefel
    from cdcore.dissolving import to_blocks

    task = get_task(_cfg(), None)
    base = dict(init=init, **_variant(cell, nonlinearity))
    ref_model, _ = build(_cfg(method="unconstrained", penalty_param=None, **base), task)
    ref = {n: getattr(ref_model.rnn, n).detach().clone() for n in ref_model.rnn._flat_weights_names}
    assert type(ref_model.rnn) is CELLS[cell] or nonlinearity == "modrelu"
    assert getattr(ref_model.rnn, "nonlinearity", "tanh") == nonlinearity or cell != "rnn"
    if init != "default":  # the init replaced every recurrent gate block by an orthogonal matrix
        for n in ref:
            if n.startswith("weight_hh"):
                assert stiefel.feasibility(to_blocks(ref[n].double(), "per_gate")).max() < 1e-5, n
    plain_head, _ = build(
        _cfg(method="unconstrained", penalty_param=None, **_variant(cell, nonlinearity)), task
    )
    assert torch.equal(plain_head.head.weight, ref_model.head.weight)  # the init draws from its own stream

    for method in METHODS:
        cfg = _cfg(method=method, penalty_param=0.5 if METHODS[method].uses_penalty else None, **base)
        before = torch.random.get_rng_state()
        model, built = build(cfg, task)
        raw = {n: r.detach() for n, (r, _) in built.weights().items()}
        assert torch.equal(model.head.weight, ref_model.head.weight), method
        for n, w in ref.items():
            if n in raw and METHODS[method].constrained:  # projected onto the manifold when attaching
                assert torch.allclose(raw[n], stiefel.projx(w), atol=1e-5), (method, n)
            else:
                assert torch.equal(raw[n] if n in raw else getattr(model.rnn, n).detach(), w), (method, n)
        # attaching a constraint does not shift the random stream after the model
        torch.random.set_rng_state(before)
        build(_cfg(method="unconstrained", penalty_param=None, **base), task)
        after_plain = torch.rand(3)
        torch.random.set_rng_state(before)
        build(cfg, task)
        assert torch.equal(torch.rand(3), after_plain), method


@pytest.mark.parametrize("cell,nonlinearity", CELL_VARIANTS, ids=_ids)
@pytest.mark.parametrize("method", list(METHODS))
def test_project_returns_an_exactly_feasible_plain_module_and_leaves_the_model(method, cell, nonlinearity):
    from cdcore import weight_feasibility

    if nonlinearity == "tanh" and cell == "rnn":
        nonlinearity = "relu"  # the exported RNN keeps its nonlinearity
    for granularity in METHODS[method].granularities if cell != "rnn" else ["stacked"]:
        cfg = _cfg(
            method=method,
            granularity=granularity,
            penalty_param=0.5 if METHODS[method].uses_penalty else None,
            **_variant(cell, nonlinearity),
        )
        model, built = build(cfg, get_task(cfg, None))
        with torch.no_grad():  # move the weights off the manifold, as training does for cd
            for r, _ in built.weights().values():
                r.add_(0.01 * torch.randn_like(r))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        plain = built.project()
        assert type(plain) is plain_class(model.rnn)[0]  # the plain class of the model's cell
        assert type(plain) is CELLS[cell] or nonlinearity == "modrelu"
        if cell == "rnn":
            assert plain.nonlinearity == nonlinearity
        for n in plain._flat_weights_names:
            if n.startswith("weight_hh"):
                assert weight_feasibility(getattr(plain, n), granularity) < 1e-5, (method, n)
            else:
                assert torch.equal(getattr(plain, n), getattr(model.rnn, n)), (method, n)
        x = torch.rand(3, 5, model.rnn.input_size)
        with torch.no_grad():
            assert torch.isfinite(plain(x)[0]).all()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # model unchanged


def test_counters_of_every_method_are_columns():
    for method in METHODS:
        cfg = _cfg(method=method, penalty_param=0.5 if METHODS[method].uses_penalty else None)
        model, built = build(cfg, get_task(cfg, None))
        assert set(built.counters(built.optimizer(model))) <= set(RUN_COLUMNS), method


def _keys_of_every_outcome(tmp_path):
    """Rows run_one returns when a run is ok, resumed, diverged and failed."""
    ok, hist = run_one(_cfg(method="cayley", penalty_param=None, epochs=1))
    diverged, _ = run_one(_cfg(lr=1e12, epochs=1))
    failed, _ = run_one(_cfg(task="no-such-task"))
    cfg = _cfg(epochs=2)

    def stop(done, total, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, checkpoint_dir=tmp_path, progress=stop)
    resumed, _ = run_one(cfg, checkpoint_dir=tmp_path)
    assert [r["status"] for r in (ok, diverged, failed, resumed)] == ["ok", "diverged", "failed", "ok"]
    assert "resumed_from_epoch" in resumed and ok["reprojections"] is not None
    return [ok, diverged, failed, resumed], hist


def test_every_key_run_one_returns_is_a_column_and_the_store_refuses_others(tmp_path):
    from bench.runner import MEASURED_COLUMNS, PROVENANCE_COLUMNS
    from bench.store import ResultStore

    rows, hist = _keys_of_every_outcome(tmp_path / "ckpt")
    for row in rows:
        assert set(row) <= set(RUN_COLUMNS), set(row) - set(RUN_COLUMNS)
    assert all(list(h) == HISTORY_COLUMNS for h in hist)
    assert set(REQUIRED) <= set(RUN_COLUMNS)
    assert not set(MEASURED_COLUMNS) & set(PROVENANCE_COLUMNS)
    with ResultStore(tmp_path / "o") as store:
        store.prepare(set())
        store.record(rows[0], hist)
        with pytest.raises(ValueError, match="no column for 'surprise'"):
            store.record({**rows[0], "surprise": 1}, hist)
    assert len(pd.read_csv(tmp_path / "o" / "runs.csv")) == 1  # the refused row wrote nothing
    assert len(pd.read_csv(tmp_path / "o" / "history.csv")) == len(hist)
