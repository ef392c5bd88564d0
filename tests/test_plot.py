"""bench.plot: plots, stats.csv and summary.md for old-style (committed) and new-style (synthetic) folders."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import plot

ROOT = Path(__file__).resolve().parent.parent
OLD = ROOT / "tests" / "data" / "smnist-quick-0.1.0"  # results/reference/smnist-quick as 0.1.0 wrote it


def new_style_folder(folder: Path, seeds=(0, 1, 2)) -> Path:
    """A sweep in the new schema: step and epoch history rows, val_metric, time to target, whole-run
    and paired throughput; lr swept; cd at penalty_param 0 and 0.5; one diverged run."""
    rng = np.random.default_rng(0)
    runs, hist = [], []
    grid = [("lstm", None), ("cd", 0.0), ("cd", 0.5), ("cayley", None), ("cdopt", 0.5)]
    for lr in (1e-3, 3e-2):
        for method, pen in grid:
            for seed in seeds:
                rid = f"{method}{pen}{lr}{seed}"
                diverged = method == "lstm" and lr == 3e-2 and seed == 2
                acc = 0.8 + 0.05 * (method != "lstm") + 0.01 * rng.standard_normal()
                reached = acc > 0.82
                runs.append(
                    {
                        "run_id": rid,
                        "method": method,
                        "task": "digits",
                        "seed": seed,
                        "cell": "lstm",
                        "num_layers": 1,
                        "hidden_size": 16,
                        "bidirectional": False,
                        "granularity": "stacked",
                        "penalty_param": pen,
                        "epochs": 2,
                        "batch_size": 32,
                        "lr": lr,
                        "lr_constrained": None,
                        "device": "cpu",
                        "profile": "smoke",
                        "train_subset": None,
                        "test_subset": None,
                        "val_size": 100,
                        "seq_len": None,
                        "perf_iters": 5,
                        "log_every": 10,
                        "eval_every": 20,
                        "schedule": "constant",
                        "clip": None,
                        "weight_decay": 0.0,
                        "status": "diverged" if diverged else "ok",
                        "error": "loss is NaN" if diverged else None,
                        "metric": "acc",
                        "baseline": None,
                        "test_metric": np.nan if diverged else acc,
                        "test_metric_projected": acc - 0.001,
                        "test_metric_at_best_val": acc + 0.002,
                        "val_metric": acc,
                        "best_val_metric": acc + 0.01,
                        "best_val_step": 80,
                        "feasibility_raw": 10.0 if method == "lstm" else 1e-3,
                        "feasibility_eff": 10.0 if method == "lstm" else 1e-5,
                        "steps_to_target": 60 if reached else None,
                        "seconds_to_target": 6.0 + seed if reached else None,
                        "target_value": 0.82,
                        "train_samples_per_s": (1000 if method == "lstm" else 800) + 10 * seed,
                        "step_samples_per_s": 1200.0,
                        "step_vs_baseline": 1.0 if method == "lstm" else 0.8 + 0.01 * seed,
                        "eval_samples_per_s": 3000.0,
                        "constraint_share": 0.1,
                        "peak_mem_mb": 100.0,
                        "train_s": 10.0,
                        "wall_s": 12.0,
                        "confusion": None,
                    }
                )
                for step in range(10, 101, 10):
                    row = {
                        "run_id": rid,
                        "method": method,
                        "task": "digits",
                        "seed": seed,
                        "penalty_param": pen,
                        "kind": "step",
                        "epoch": 1 + (step > 50),
                        "step": step,
                        "train_wall_s": step / 10 + seed,
                        "samples": 32 * step,
                        "train_loss": 2.0 / step + 0.01 * seed,
                        "penalty": None,
                        "feasibility_raw": 1e-3 * step,
                        "feasibility_eff": 1e-5 * step,
                        "val_metric": 0.5 + step / 300 if step % 20 == 0 else None,
                        "test_metric": None,
                        "lr": lr,
                    }
                    hist.append(row)
                    if step % 50 == 0:
                        hist.append({**row, "kind": "epoch", "test_metric": 0.5 + step / 250})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(runs).to_csv(folder / "runs.csv", index=False)
    pd.DataFrame(hist).to_csv(folder / "history.csv", index=False)
    return folder


@pytest.fixture
def figures(monkeypatch):
    """Every figure make_all saves, by file name, with its axes' state at saving time."""
    seen = {}
    save = plot._save

    def spy(fig, path, dpi=110):
        seen[Path(path).name] = [
            {
                "xscale": ax.get_xscale(),
                "xlim": ax.get_xlim(),
                "yscale": ax.get_yscale(),
                "lines": [ln.get_xdata() for ln in ax.get_lines()],
            }
            for ax in fig.axes
        ]
        seen[Path(path).name + ":title"] = fig._suptitle.get_text() if fig._suptitle else ""
        save(fig, path, dpi)

    monkeypatch.setattr(plot, "_save", spy)
    return seen


def nonempty(folder, names):
    for n in names:
        assert (folder / n).is_file() and (folder / n).stat().st_size > 1000, n


def test_old_style_folder_draws(tmp_path, figures):
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    for png in folder.glob("*.png"):
        png.unlink()
    assert plot.main([str(folder)]) == 0  # what `python -m bench.plot <folder>` runs
    images = sorted(p.name for p in folder.glob("*.png"))
    nonempty(folder, images)
    assert {"metric_vs_penalty.png", "curves_smnist.png", "throughput.png", "confusion_cd.png"} <= set(images)
    assert "from epoch rows" in figures["curves_smnist.png:title"]
    st = pd.read_csv(folder / "stats.csv")
    assert (st["n"] == 1).all() and st["ci_low"].isna().all()
    summary = (folder / "summary.md").read_text()
    assert "**n = 1** for every configuration" in summary and "n=1, no interval" in summary
    assert "predates whole-run throughput" in summary
    assert not any(n.startswith("time_to_target") for n in images)


def test_new_style_folder_draws_everything(tmp_path, figures):
    folder = new_style_folder(tmp_path / "new")
    images = plot.make_all(folder)
    nonempty(folder, images)
    assert {
        "metric_vs_penalty_0.png",
        "metric_vs_penalty_1.png",
        "curves_digits.png",
        "time_to_target_digits.png",
        "metric_vs_lr.png",
        "throughput.png",
    } <= set(images)
    assert "from step rows" in figures["curves_digits.png:title"]
    lr_axes = figures["metric_vs_lr.png"]
    assert len(lr_axes) == 2 and all(a["xscale"] == "log" for a in lr_axes)  # 1e-3 .. 3e-2 spans 30x
    st = pd.read_csv(folder / "stats.csv")
    assert {"mean", "difference", "ratio"} <= set(st["kind"])
    assert set(st.loc[st["kind"] == "difference", "baseline"]) == {"lstm", "cdopt"}
    summary = (folder / "summary.md").read_text()
    for text in (
        "paired t",
        "## Time to target",
        "step_vs_baseline",
        "**diverged**",
        "(n=3)",
        "![time_to_target_digits.png](time_to_target_digits.png)",
    ):
        assert text in summary, text
    assert "verdict" in summary and ("better than lstm" in summary or "no detectable difference" in summary)


def test_penalty_zero_is_on_the_axis(tmp_path, figures):
    folder = new_style_folder(tmp_path / "new", seeds=(0,))
    plot.make_all(folder)
    ax = figures["metric_vs_penalty_0.png"][0]
    assert ax["xscale"] == "symlog"
    lo, hi = ax["xlim"]
    assert lo < 0.0 < 0.5 < hi
    assert any(0.0 in np.asarray(x, dtype=float) for x in ax["lines"])


def test_cli_refuses_a_bad_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "nope")], [str(tmp_path / "empty")], [], ["a", "b"]):
        assert plot.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bench.plot: error:") and "runs.csv" in err
    assert not any((tmp_path / "empty").iterdir())


def test_folder_without_ok_runs_still_writes_a_summary(tmp_path):
    folder = new_style_folder(tmp_path / "new", seeds=(0,))
    runs = pd.read_csv(folder / "runs.csv").assign(status="failed", error="RuntimeError: boom")
    runs.to_csv(folder / "runs.csv", index=False)
    plot.make_all(folder)
    summary = (folder / "summary.md").read_text()
    assert summary.count("**failed**") == len(runs) and "0/1" in summary
    runs.iloc[:0].to_csv(folder / "runs.csv", index=False)
    assert plot.make_all(folder) == [] and (folder / "summary.md").is_file()


def test_a_torn_last_line_is_dropped_not_read_as_a_run(tmp_path):
    """A sweep killed inside a write (or still writing) can leave runs.csv / history.csv ending in
    half a row; pandas alone would read it as a run with truncated values and count it in the
    statistics.  The plots and summary see the complete rows only, as the store does."""
    whole = new_style_folder(tmp_path / "intactdir", seeds=(0, 1))
    torn = tmp_path / "torndir"
    shutil.copytree(whole, torn)
    text = (whole / "runs.csv").read_text()
    (torn / "runs.csv").write_text(text + text.splitlines(keepends=True)[1][:60])  # half a copy of row 1
    hist = (whole / "history.csv").read_text()
    (torn / "history.csv").write_text(hist + hist.splitlines(keepends=True)[-1][:-20])
    plot.make_all(whole)
    plot.make_all(torn)
    assert (torn / "stats.csv").read_text() == (whole / "stats.csv").read_text()
    summary = (whole / "summary.md").read_text()
    assert (torn / "summary.md").read_text() == summary.replace("intactdir", "torndir")


def test_cli_refuses_an_empty_runs_csv(tmp_path, capsys):
    (tmp_path / "runs.csv").write_text("")
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.plot: error:") and "runs.csv" in err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(flag, capsys, tmp_path, monkeypatch):
    """``python -m bench.plot --help`` (issue 21 item 11): usage on stdout, exit 0, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert plot.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m bench.plot FOLDER") and err == ""
    assert list(tmp_path.iterdir()) == []
