"""The store never loses a row (issue 21 items 4, 5, 11): --force keeps an old row until its
replacement is recorded, columns it does not know are kept, and a foreign or malformed runs.csv,
history.csv or meta.json is refused with one line, nothing changed."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import TINY

from bench import ablate, plot

ROOT = Path(__file__).resolve().parents[1]
ARGS = [*TINY, "--methods", "unconstrained", "--seeds", "0", "1"]

#: ``python -c KILL_AT_FIRST_RUN ARGS...``: a sweep that SIGKILLs itself as its first run starts
#: (after the plan line and the store's compaction)
KILL_AT_FIRST_RUN = r"""
import os, signal, sys
import bench.executors as ex

def run_one_killed(cfg, *args, **kw):
    print("killed at", cfg.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

ex.run_one = run_one_killed
from bench.ablate import main
sys.exit(main(sys.argv[1:]))
"""


def swept(tmp_path, *extra) -> Path:
    out = tmp_path / "o"
    assert ablate.main([*ARGS, "--out", str(out), *extra]) == 0
    return out


def snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


def test_force_killed_after_its_plan_keeps_the_old_rows(tmp_path):
    out = swept(tmp_path)
    before = {n: pd.read_csv(out / n) for n in ("runs.csv", "history.csv")}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_FIRST_RUN, *ARGS, "--out", str(out), "--force"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9 and "killed at" in proc.stdout, proc.stderr[-2000:]
    for name, old in before.items():
        pd.testing.assert_frame_equal(pd.read_csv(out / name), old)
    # the forced sweep then replaces each row exactly once, with its history
    assert ablate.main([*ARGS, "--out", str(out), "--force"]) == 0
    runs, hist = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "history.csv")
    assert len(runs) == 2 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    assert set(runs["run_id"]) == set(before["runs.csv"]["run_id"])
    assert len(hist) == len(before["history.csv"]) and not hist.duplicated(["run_id", "kind", "step"]).any()


def test_unknown_columns_are_kept_through_rewrites_and_appends(tmp_path):
    out = swept(tmp_path)
    for name in ("runs.csv", "history.csv"):
        df = pd.read_csv(out / name)
        df["note_by_other_tool"] = "keep me"
        df.to_csv(out / name, index=False)
    assert ablate.main([*ARGS, "--seeds", "0", "1", "2", "--out", str(out)]) == 0  # compacts, appends seed 2
    runs, hist = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "history.csv")
    assert len(runs) == 3
    assert (runs.set_index("seed")["note_by_other_tool"].fillna("") == ["keep me", "keep me", ""]).all()
    assert (hist.groupby("run_id")["note_by_other_tool"].first().notna()).sum() == 2
    assert ablate.main([*ARGS, "--out", str(out), "--force"]) == 0  # replacements: the column stays
    assert "note_by_other_tool" in pd.read_csv(out / "runs.csv")


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("runs.csv", "a,b\n1,2\n", "no run_id column"),
        ("history.csv", "epoch,loss\n1,0.5\n", "no run_id column"),
        ("meta.json", "{not json", "not readable as JSON"),
        ("meta.json", "[1, 2]", "not an object"),
        ("meta.json", json.dumps({"command": 3}), "'command' is not a string"),
        ("meta.json", json.dumps({"invocations": "x"}), "'invocations' is not a list"),
    ],
)
def test_foreign_or_malformed_files_are_refused_with_nothing_changed(
    tmp_path, capsys, name, content, problem
):
    out = swept(tmp_path)
    (out / name).write_text(content)
    before = snapshot(out)
    capsys.readouterr()
    assert ablate.main([*ARGS, "--out", str(out)]) == 2
    if name != "runs.csv":  # bench.plot refuses an empty/foreign runs.csv on its own
        assert plot.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert problem in err and str(out / name) in err and "Traceback" not in err
    assert snapshot(out) == before
