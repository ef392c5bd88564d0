"""Issue 21 item 11: the CLIs end with one line, never a traceback (plots, flags, Ctrl-C, dry-run)."""

import json

import pandas as pd
import pytest
from test_plot import new_style_folder
from test_sweep import TINY

from bench import ablate, plot


def test_an_ok_run_without_test_metric_skips_its_confusion_matrix(tmp_path, capsys):
    folder = new_style_folder(tmp_path / "f", seeds=(0,))
    runs = pd.read_csv(folder / "runs.csv")
    runs["confusion"] = json.dumps([[3, 1], [0, 4]])
    runs.loc[runs["method"] == "cayley", "test_metric"] = None  # ok, yet no test metric
    runs.to_csv(folder / "runs.csv", index=False)
    images = plot.make_all(folder)
    assert "confusion_cd.png" in images and "confusion_cayley.png" not in images
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "confusion matrix for cayley" in err and "no test metric" in err


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--eval-every", "5"], "--eval-every 5 with --val-size 0"),
        (["--target", "0.9"], "--target 0.9 with --val-size 0"),
        (["--eval-every", "5", "--target", "0.9"], "--eval-every 5 and --target 0.9 with --val-size 0"),
    ],
)
def test_validation_flags_without_a_validation_split_are_refused(flags, named, tmp_path, capsys):
    """Without a validation split nothing is evaluated every K steps and time to target (measured
    on the validation metric only) is never computed: the flags used to be dropped silently."""
    out = tmp_path / "o"
    assert ablate.main([*TINY, "--val-size", "0", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "use --val-size N" in err and "Traceback" not in err
    assert not out.exists()


def test_workers_times_threads_above_the_cores_is_noted_in_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablate, "physical_cores", lambda: 2, raising=False)
    args = [
        *TINY,
        "--methods",
        "unconstrained",
        "--executor",
        "auto",
        "--dry-run",
        "--out",
        str(tmp_path / "o"),
    ]
    assert ablate.main([*args, "--workers", "5", "--threads-per-run", "2"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "oversubscribed" in ln]
    assert notes == [
        "note: --workers 5 x --threads-per-run 2 = 10 torch threads on 2 physical cores: oversubscribed, "
        "the runs compete for cores and each trains slower"
    ]
    assert ablate.main([*args, "--workers", "2", "--threads-per-run", "1"]) == 0
    assert "oversubscribed" not in capsys.readouterr().out
