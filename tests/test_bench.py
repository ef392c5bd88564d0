"""End-to-end and reliability tests of the harness (issues 3 and 5)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import ablate
from bench.methods import METHODS
from bench.runner import RunConfig, build, get_task, run_one
from bench.store import RUN_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["run_id", "method", "task", "seed", "num_layers", "hidden_size", "bidirectional", "granularity",
            "penalty_param", "epochs", "batch_size", "lr", "device", "status", "test_acc", "test_acc_projected",
            "train_loss", "feasibility_raw", "feasibility_eff", "train_samples_per_s", "eval_samples_per_s",
            "peak_mem_mb", "wall_s", "torch_version", "git_commit"]
DIGITS = ["--task", "digits", "--profile", "smoke", "--no-progress", "--no-plots"]


def cli(*args, check=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "bench.ablate", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, env=env, **kw)
    if check is not None:
        assert p.returncode == check, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_smoke_sweep_on_real_mnist_end_to_end(mnist_dir, tmp_path):
    out = tmp_path / "sweep"
    p = cli("--penalty", "0.1", "0.5", "1.0", "--profile", "smoke", "--data-dir", mnist_dir, "--out", out,
            "--no-progress", check=0)
    assert "plan: 10 runs" in p.stdout
    runs = pd.read_csv(out / "runs.csv")
    assert set(REQUIRED) <= set(runs.columns)
    assert (runs["status"] == "ok").all()
    counts = runs["method"].value_counts().to_dict()
    assert counts == {"lstm": 1, "cd": 3, "geotorch_expm": 1, "geotorch_cayley": 1, "cayley": 1, "cdopt": 3}
    assert sorted(runs.loc[runs.method == "cd", "penalty_param"]) == [0.1, 0.5, 1.0]
    assert runs.loc[runs.method == "lstm", "penalty_param"].isna().all()
    assert runs["run_id"].is_unique
    assert (runs["n_test"] == 512).all() and (runs["task"] == "smnist").all()
    assert runs["test_acc"].between(0, 1).all()
    constrained = runs[runs.method.isin(["geotorch_expm", "geotorch_cayley", "cayley"])]
    assert (constrained["feasibility_raw"] < 1e-4).all()
    cd = runs[runs.method == "cd"]
    assert (cd["feasibility_eff"] < cd["feasibility_raw"]).all()
    assert (runs["train_samples_per_s"] > 0).all() and (runs["peak_mem_mb"] > 0).all()
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == len(runs) and set(hist["run_id"]) == set(runs["run_id"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"].startswith("python -m bench.ablate --penalty 0.1 0.5 1.0")
    assert meta["torch_version"] == torch.__version__ and meta["cpu_count"] >= 1
    for png in ["metric_vs_penalty.png", "feasibility_vs_epoch.png", "throughput.png", "confusion_cd.png"]:
        assert (out / png).stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| cd" in summary and "![throughput.png](throughput.png)" in summary
    # redraw from the CSVs alone
    for png in out.glob("*.png"):
        png.unlink()
    subprocess.run([sys.executable, "-m", "bench.plot", str(out)], cwd=ROOT, check=True, capture_output=True)
    assert (out / "metric_vs_penalty.png").is_file() and (out / "confusion_cdopt.png").is_file()


def test_full_test_set_is_scored(mnist_dir):
    task = get_task(RunConfig(method="lstm", task="smnist", test_subset=None), mnist_dir)
    assert task.n_test == 10_000 and task.n_train == 60_000


BAD = [
    (["--methods", "lstm", "nope"], "unknown method 'nope'; allowed: lstm, cd"),
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


def test_cuda_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ablate.main([*DIGITS, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "device 'cuda' asked for but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_input_never_touches_existing_results(tmp_path):
    out = tmp_path / "o"
    cli(*DIGITS, "--methods", "lstm", "--out", out, check=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    p = cli(*DIGITS, "--methods", "lstm", "--hidden", "-3", "--out", out, check=2)
    assert "Traceback" not in p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_mnist_names_data_dir_and_digits(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def no_network(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    code = ablate.main(["--profile", "smoke", "--methods", "lstm", "--data-dir", str(tmp_path / "empty"),
                        "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-dir" in err and "'digits'" in err and err.count("\n") == 1


def test_resume_skips_ok_runs_and_force_reruns_without_duplicates(tmp_path):
    out = tmp_path / "o"
    args = [*DIGITS, "--methods", "lstm", "cd", "--penalty", "0.5", "1.0", "--out", out]
    cli(*args, check=0)
    first = pd.read_csv(out / "runs.csv")
    p = cli(*args, check=0)
    assert "3 already ok, skipped; 0 to run" in p.stdout
    assert pd.read_csv(out / "runs.csv").equals(first)
    cli(*args, "--force", check=0)
    again = pd.read_csv(out / "runs.csv")
    assert again["run_id"].is_unique and set(again["run_id"]) == set(first["run_id"])
    assert len(pd.read_csv(out / "history.csv")) == len(again)


def test_sigkill_mid_sweep_then_resume_gives_exactly_the_planned_ok_rows(tmp_path):
    out = tmp_path / "o"
    args = [*DIGITS, "--methods", "lstm", "cd", "cayley", "--penalty", "0.1", "0.5", "1.0", "--seeds", "0", "1",
            "--epochs", "3", "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "bench.ablate", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = out / "runs.csv"
        if runs.is_file() and runs.read_text().count("\n") >= 3:  # header + 2 rows
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(out / "runs.csv")  # parseable after SIGKILL
    pd.read_csv(out / "history.csv")
    assert 2 <= len(partial) < 10
    cli(*args, check=0)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 10 * 3 and not hist.duplicated(["run_id", "epoch"]).any()


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "o"
    args = [*DIGITS, "--methods", "lstm", "--seeds", "0", "1", "--out", out]
    cli(*args, check=0)
    with open(out / "runs.csv", "a") as f:
        f.write("deadbeef0000,cd,smnist,0,1")  # a half-written row, no newline
    cli(*args, check=0)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and "deadbeef0000" not in set(runs["run_id"])


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "o"
    p = cli(*DIGITS, "--methods", "cd", "lstm", "--penalty", "0.5", "--lr", "5e-3", "1e12", "--out", out)
    assert p.returncode == 3, p.stderr[-2000:]
    runs = pd.read_csv(out / "runs.csv").set_index(["method", "lr"])
    assert runs.loc[("cd", 1e12), "status"] == "diverged"
    assert runs.loc[("cd", 1e12), "diverged_epoch"] == 1
    assert runs.loc[("cd", 5e-3), "status"] == "ok" and runs.loc[("lstm", 5e-3), "status"] == "ok"
    assert "diverged" in p.stdout.splitlines()[-1]


def test_failed_run_is_isolated(tmp_path, monkeypatch, capsys):
    import bench.methods as methods

    def broken(lstm, cfg):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(methods.METHODS, "cayley", methods.Method("cayley", "", "", broken))
    out = tmp_path / "o"
    code = ablate.main([*DIGITS, "--methods", "lstm", "cayley", "--out", str(out)])
    assert code == 3
    runs = pd.read_csv(out / "runs.csv").set_index("method")
    assert runs.loc["cayley", "status"] == "failed"
    assert runs.loc["cayley", "error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert runs.loc["lstm", "status"] == "ok"
    ablate.main([*DIGITS, "--methods", "lstm", "cayley", "--out", str(out)])  # summary draws the failed run
    from bench import plot

    plot.make_all(out)
    assert "**failed**" in (out / "summary.md").read_text()


def test_second_sweep_on_a_busy_folder_refuses(tmp_path):
    from filelock import FileLock

    out = tmp_path / "o"
    cli(*DIGITS, "--methods", "lstm", "--out", out, check=0)
    before = (out / "runs.csv").read_bytes()
    with FileLock(str(out / ".lock")):
        p = cli(*DIGITS, "--methods", "lstm", "--seeds", "1", "--out", out, check=2)
    assert "another sweep is writing to" in p.stderr and p.stderr.count("\n") == 1
    assert (out / "runs.csv").read_bytes() == before


def test_two_concurrent_sweeps_one_folder(tmp_path):
    out = tmp_path / "o"
    slow = [*DIGITS, "--methods", "lstm", "--hidden", "32", "--epochs", "400", "--seeds", "0", "1", "2"]
    a = subprocess.Popen([sys.executable, "-m", "bench.ablate", *slow, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "meta.json").is_file() and time.time() < deadline:
            time.sleep(0.05)
        b = cli(*slow, "--out", out)
        assert a.poll() is None, "the first sweep ended before the second started: make it slower"
        assert b.returncode == 2 and "another sweep is writing to" in b.stderr
        assert b.stderr.count("\n") == 1
    finally:
        a.kill()
        a.wait()
    runs = pd.read_csv(out / "runs.csv")  # the first sweep's files are intact
    assert runs["run_id"].is_unique and (runs["status"] == "ok").all()


def _cfg(**kw):
    base = dict(method="cd", task="digits", num_layers=2, hidden_size=8, bidirectional=True, epochs=2,
                batch_size=64, lr=5e-3, penalty_param=0.5, perf_iters=1)
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


def test_every_method_starts_from_the_same_unconstrained_weights():
    task = get_task(_cfg(), None)
    ref_model, _ = build(_cfg(method="lstm", penalty_param=None), task)
    ref = {n: getattr(ref_model.rnn, n).detach().clone() for n in ref_model.rnn._flat_weights_names}
    from cdcore import stiefel

    for method in METHODS:
        cfg = _cfg(method=method, penalty_param=0.5 if METHODS[method].uses_penalty else None)
        before = torch.random.get_rng_state()
        model, built = build(cfg, task)
        assert torch.equal(model.head.weight, ref_model.head.weight), method
        for n, w in ref.items():
            got = getattr(model.rnn, n).detach()
            if n.startswith("weight_hh") and method != "lstm":
                if method == "cdopt" or method == "cd":
                    got = built.weights()[n][0].detach()
                assert torch.allclose(got, stiefel.projx(w), atol=1e-5), (method, n)
            else:
                assert torch.equal(got, w), (method, n)
        # attaching a constraint does not shift the random stream after the model
        torch.random.set_rng_state(before)
        build(_cfg(method="lstm", penalty_param=None), task)
        after_lstm = torch.rand(3)
        torch.random.set_rng_state(before)
        build(cfg, task)
        assert torch.equal(torch.rand(3), after_lstm), method


def test_run_columns_cover_the_required_schema():
    assert set(REQUIRED) <= set(RUN_COLUMNS)
