"""What a sweep writes and prints (issue 12: the acceptance command, --dry-run, progress output
on a terminal and in a log, the recipe and validation flags, penalty_param 0 on the plots)."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench import ablate, plot
from bench.executors import LocalExecutor
from bench.runner import RunConfig
from cdcore import support

DIGITS = ["--task", "digits", "--profile", "smoke", "--no-progress", "--executor", "local"]
TINY = [*DIGITS, "--no-plots", "--epochs", "1", "--train-subset", "256", "--hidden", "8"]


def sweep(*args) -> int:
    return ablate.main([str(a) for a in args])


def check_acceptance_folder(out: Path, methods: set[str], seeds: int) -> None:
    """What issue 12's "Done when" asks of a sweep folder."""
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["status"] == "ok").all() and set(runs["method"]) == methods
    for col in [
        "val_metric",
        "best_val_metric",
        "test_metric_at_best_val",
        "target_value",
        "steps_to_target",
        "seconds_to_target",
        "train_samples_per_s",
        "step_samples_per_s",
        "step_vs_baseline",
    ]:
        assert col in runs, col
    assert runs["val_metric"].notna().all() and (runs["val_size"] == 360).all()
    assert runs["target_value"].eq(0.85).all()
    hist = pd.read_csv(out / "history.csv")
    steps = hist[hist["kind"] == "step"]
    assert steps.groupby("run_id").size().min() >= 50  # >= 50 logged points per run
    assert steps["val_metric"].notna().any() and steps["feasibility_raw"].notna().all()
    st = pd.read_csv(out / "stats.csv")
    means = st[st["kind"] == "mean"]
    assert (means["n"] == seeds).all() and means[["ci_low", "ci_high"]].notna().all().all()
    diff = st[st["kind"] == "difference"]
    assert len(diff) and diff["test"].eq("paired t").all() and diff["p_value"].notna().any()
    assert {"test_metric", "test_metric_at_best_val"} <= set(diff["quantity"])
    for png in ["curves_digits.png", "time_to_target_digits.png", "metric_vs_penalty.png", "throughput.png"]:
        assert (out / png).stat().st_size > 1000, png
    summary = (out / "summary.md").read_text()
    assert "## Paired differences" in summary and "## Time to target" in summary
    assert "predates whole-run throughput" not in summary  # the old caveat no longer applies
    assert "comes from only 2 interleaved rounds" in summary  # the smoke profile's perf_iters


@pytest.mark.slow(reason="18 runs of the digits smoke profile and the plots: about a minute on 2 cores")
def test_issue_12_acceptance_command(tmp_path):
    """``python -m bench.ablate --profile smoke --task digits --seeds 0 1 2 --out <tmp>``."""
    out = tmp_path / "acc"
    assert sweep("--profile", "smoke", "--task", "digits", "--seeds", 0, 1, 2, "--out", out) == 0
    check_acceptance_folder(
        out, {"unconstrained", "cd", "geotorch_expm", "geotorch_cayley", "cayley", "cdopt"}, seeds=3
    )
    assert (pd.read_csv(out / "stats.csv").query("kind == 'difference'")["baseline"] == "cdopt").any()


def test_acceptance_small_with_penalty_zero_on_the_axis(tmp_path, monkeypatch):
    """The fast variant: two methods, two seeds, penalty_param 0 and 0.5 drawn end to end."""
    axes = {}
    save = plot._save

    def spy(fig, path, dpi=110):
        axes[Path(path).name] = fig.axes[0]
        axes[Path(path).name + ":x"] = [np.asarray(ln.get_xdata(), float) for ln in fig.axes[0].get_lines()]
        save(fig, path, dpi)

    monkeypatch.setattr(plot, "_save", spy)
    out = tmp_path / "small"
    args = [
        *DIGITS,
        "--methods",
        "lstm",
        "cd",
        "--penalty",
        0,
        0.5,
        "--seeds",
        0,
        1,
        "--hidden",
        8,
        "--epochs",
        2,
    ]
    with pytest.warns(UserWarning, match="penalty_param=0"):
        assert sweep(*args, "--out", out) == 0
    check_acceptance_folder(out, {"unconstrained", "cd"}, seeds=2)
    ax = axes["metric_vs_penalty.png"]
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0.0 < 0.5 < ax.get_xlim()[1]
    assert any((x == 0.0).any() for x in axes["metric_vs_penalty.png:x"])  # penalty_param 0 drawn


# ---------------------------------------------------------------------------------------------
# flags


BAD = [
    (["--amp", "fp16"], "--amp fp16 needs --device cuda (float16 training uses a CUDA GradScaler)"),
    (["--amp", "fp32"], "unknown amp 'fp32'; allowed: off, bf16, fp16"),
    (["--schedule", "linear"], "unknown schedule 'linear'; allowed: constant, cosine, onecycle"),
    (["--clip", "0"], "clip must be a finite number > 0; got '0'"),
    (["--weight-decay", "-0.001"], "weight-decay must be a finite number >= 0; got '-0.001'"),
    (["--val-size", "-1"], "val-size must be a non-negative integer; got '-1'"),
    (["--val-size", "1437"], "val_size must be in 0..1436 (1437 digits in the training split); got 1437"),
    (["--log-every", "0"], "log-every must be a positive integer; got '0'"),
    (["--eval-every", "x"], "eval-every must be a positive integer; got 'x'"),
    (["--target", "nan"], "target must be a finite number; got 'nan'"),
    (
        ["--target", "98"],
        "--target 98: task digits measures accuracy as a fraction; allowed: 0 < target <= 1",
    ),
    (
        ["--target", "-1"],
        "--target -1: task digits measures accuracy as a fraction; allowed: 0 < target <= 1",
    ),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_recipe_flags_are_one_line_exit_2_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert ablate.main([*TINY, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_recipe_flags_reach_the_runs_and_multiply_the_grid(tmp_path):
    # the lstm cell where this platform's nn.LSTM runs bf16 autocast, else gru (such a plan is
    # refused: the test below)
    cell = "lstm" if support.autocast_unsupported("lstm", "cpu", torch.bfloat16) is None else "gru"
    out = tmp_path / "o"
    args = [
        *TINY,
        "--methods",
        "lstm",
        "--cell",
        cell,
        "--schedule",
        "constant",
        "onecycle",
        "--clip",
        1,
        "--weight-decay",
    ]
    assert sweep(*args, 0, 1e-3, "--amp", "bf16", "--val-size", 100, "--log-every", 2, "--out", out) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    assert set(zip(runs["schedule"], runs["weight_decay"])) == {
        ("constant", 0.0),
        ("constant", 1e-3),
        ("onecycle", 0.0),
        ("onecycle", 1e-3),
    }
    assert (runs["clip"] == 1.0).all() and (runs["amp"] == "bf16").all()
    assert (runs["val_size"] == 100).all() and (runs["log_every"] == 2).all()
    assert (runs["n_train"] == 256).all()  # train_subset after the 100 held out


def test_amp_bf16_is_refused_at_planning_where_the_platform_nn_module_cannot_run_it(tmp_path, capsys):
    """On every CPU: ``--amp bf16`` with the lstm cell plans where this platform's own nn.LSTM runs
    bf16 autocast, and is refused with one line naming the reason (exit 2, nothing written)
    where it cannot (an AVX2-only CPU; CI caps oneDNN to see it: .ci/run)."""
    out = tmp_path / "o"
    reason = support.autocast_unsupported("lstm", "cpu", torch.bfloat16)
    code = sweep(*TINY, "--methods", "lstm", "--amp", "bf16", "--dry-run", "--out", out)
    err = capsys.readouterr().err
    if reason is None:
        assert code == 0 and err == ""
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"--amp bf16 with --cell lstm on this CPU: {reason}; allowed here: --amp off" in err
    assert not out.exists()


def test_amp_bf16_refusal_names_the_cell_and_spares_the_others(tmp_path, capsys, monkeypatch):
    """The planning check asks the probe about every cell of the plan's cpu runs (here a
    platform whose nn.GRU alone cannot: the refusal names gru; a gru-free plan passes)."""
    asked = []

    def probe(cell, device_type="cpu", dtype=torch.bfloat16):
        asked.append((cell, device_type, dtype))
        return (
            "this platform's nn.GRU cannot run bfloat16 autocast on cpu: no primitive"
            if cell == "gru"
            else None
        )

    monkeypatch.setattr(support, "autocast_unsupported", probe)
    base = [*TINY, "--methods", "lstm", "--amp", "off", "bf16", "--out", tmp_path / "o"]
    assert sweep(*base, "--cell", "lstm", "gru") == 2
    err = capsys.readouterr().err
    assert "--amp bf16 with --cell gru on this CPU: this platform's nn.GRU cannot" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert ("gru", "cpu", torch.bfloat16) in asked
    asked.clear()
    assert sweep(*base[:-2], "--amp", "off", "--cell", "gru", "--dry-run", "--out", tmp_path / "o") == 0
    assert asked == []  # no bf16 run: nothing to ask
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# --dry-run


def tree(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_prints_the_plan_and_an_estimate_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert sweep(*TINY, "--methods", "lstm", "cd", "--out", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "plan: 2 runs" in text and "0 already ok" in text and "dry run: nothing written" in text
    assert "2 from one measured step each" in text and "estimated time for the 2 runs to do" in text
    assert "executor " in text  # how the runs would be packed, as a real sweep prints it
    # after a real sweep: the ok runs are counted, new seeds estimated from the recorded throughput
    assert sweep(*TINY, "--methods", "lstm", "cd", "--out", out) == 0
    before = tree(out)
    capsys.readouterr()
    assert sweep(*TINY, "--methods", "lstm", "cd", "--seeds", 0, 1, "--out", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert tree(out) == before  # nothing written, not even meta.json or a compacted CSV
    assert "plan: 4 runs" in text and "(2 already ok, skipped; 2 to run)" in text
    assert "2 from the throughput recorded in" in text and "0 from one measured step" in text
    assert sweep(*TINY, "--methods", "lstm", "--seeds", 0, "--out", out, "--dry-run", "--force") == 0
    assert "(0 already ok, skipped; 1 to run)" in capsys.readouterr().out
    assert tree(out) == before


def test_recorded_estimate_scales_with_the_training_samples():
    rows = [
        dict(
            status="ok",
            method="cd",
            task="digits",
            num_layers="1",
            hidden_size="8",
            bidirectional="False",
            granularity="stacked",
            batch_size="32",
            device="cpu",
            seq_len="8",
            amp="",
            epochs="2",
            n_train="1000",
            wall_s="10.0",
        )
    ]
    cfg = RunConfig(
        method="cd",
        task="digits",
        num_layers=1,
        hidden_size=8,
        bidirectional=False,
        batch_size=32,
        epochs=6,
        val_size=360,
    )
    ((c, seconds, source),) = ablate.estimate([cfg], rows, None)
    assert source == "recorded" and seconds == pytest.approx(10.0 / 2000 * 6 * 1077)


# ---------------------------------------------------------------------------------------------
# progress output


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def _run_local(stream, progress=True):
    cfg = RunConfig(
        method="lstm",
        task="digits",
        num_layers=1,
        hidden_size=4,
        bidirectional=False,
        epochs=2,
        train_subset=64,
        batch_size=32,
        perf_iters=1,
    )
    results = []
    LocalExecutor().run(
        [cfg], lambda c, r, h: results.append(r["status"]), data_dir=None, progress=progress, stream=stream
    )
    assert results == ["ok"]
    return cfg, stream.getvalue()


def test_progress_in_a_log_is_plain_lines():
    cfg, text = _run_local(Stream(tty=False))
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == f"bench: run 1/1 {cfg.run_id} {cfg.method} digits seed 0 started"
    assert [ln.split(": ")[-1].split(" (")[0] for ln in lines[1:]] == ["epoch 1/2 done", "epoch 2/2 done"]


def test_progress_on_a_terminal_is_bars_and_nothing_without_progress():
    _, text = _run_local(Stream(tty=True))
    assert "\r" in text and "runs" in text and "started" not in text
    _, text = _run_local(Stream(tty=False), progress=False)
    assert text == ""


def test_ablate_progress_goes_to_stderr_as_lines_when_not_a_terminal(tmp_path, capfd):
    args = [a for a in TINY if a != "--no-progress"]
    assert sweep(*args, "--methods", "lstm", "--out", tmp_path / "o") == 0
    err = capfd.readouterr().err
    assert "started" in err and "epoch 1/1 done" in err and "\r" not in err
