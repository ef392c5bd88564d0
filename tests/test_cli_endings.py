"""Issue 21 item 11: the CLIs end with one line, never a traceback (plots, flags, Ctrl-C, dry-run)."""

import json

import pandas as pd
from test_plot import new_style_folder

from bench import plot


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
