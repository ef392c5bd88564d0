"""A results folder can never write outside itself (issue 21, item 3): every file the tools write
in it goes to a temporary file beside it and is renamed over the target (a symbolic link there is
replaced, never followed); a folder that is itself a link is refused with one line."""

import os
from pathlib import Path

import pytest
from test_plot import new_style_folder
from test_sweep import TINY

from bench import ablate, fsio, plot
from bench.errors import UsageError
from bench.perf import cli as perf_cli

SECRET = "the user's own file\n"


def outside(tmp_path: Path) -> Path:
    victim = tmp_path / "home" / "victim.txt"
    victim.parent.mkdir(exist_ok=True)
    victim.write_text(SECRET)
    return victim


def link(path: Path, to: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(to)


def test_plot_replaces_linked_outputs_and_never_writes_through_them(tmp_path):
    victim = outside(tmp_path)
    folder = new_style_folder(tmp_path / "f")
    plot.make_all(folder)
    png = sorted(folder.glob("*.png"))[0]
    for name in ("summary.md", "stats.csv", png.name):
        link(folder / name, victim)
    assert plot.main([str(folder)]) == 0
    assert victim.read_text() == SECRET
    for name in ("summary.md", "stats.csv", png.name):
        assert not (folder / name).is_symlink() and (folder / name).stat().st_size > 0
    assert not list(folder.glob(".*.tmp"))


def test_plot_and_ablate_refuse_a_linked_folder(tmp_path, capsys):
    folder = new_style_folder(tmp_path / "real")
    (tmp_path / "alias").symlink_to(folder)
    assert plot.main([str(tmp_path / "alias")]) == 2
    assert ablate.main([*TINY, "--out", str(tmp_path / "alias")]) == 2
    err = capsys.readouterr().err
    assert err.count("symbolic link") == 2 and "Traceback" not in err


def test_ablate_with_every_run_skipped_never_writes_outside(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--methods", "unconstrained", "--out", str(out)]
    args.remove("--no-plots")
    assert ablate.main(args) == 0
    victim = outside(tmp_path)
    names = ["summary.md", "stats.csv", "runs.csv", "history.csv", "meta.json"]
    names.append(sorted(p.name for p in out.glob("*.png"))[0])
    keep = {}
    for name in names:
        if name in ("runs.csv", "history.csv", "meta.json"):
            keep[name] = (out / name).read_text()
            (tmp_path / f"copy-{name}").write_text(keep[name])
            link(out / name, tmp_path / f"copy-{name}")  # a link to outside holding the real rows
        else:
            link(out / name, victim)
    assert ablate.main(args) == 0  # every run already ok: skipped
    assert victim.read_text() == SECRET
    for name in keep:
        assert (tmp_path / f"copy-{name}").read_text() == keep[name]
    for name in names:
        assert not (out / name).is_symlink(), name


def test_appends_refuse_a_linked_csv(tmp_path):
    victim = outside(tmp_path)
    link(tmp_path / "runs.csv", victim)
    with pytest.raises(UsageError, match="symbolic link"):
        os.close(fsio.open_append(tmp_path / "runs.csv"))
    assert victim.read_text() == SECRET


def test_write_atomic_replaces_a_link_and_leaves_no_temporary(tmp_path):
    victim = outside(tmp_path)
    link(tmp_path / "command.txt", victim)
    fsio.write_atomic(tmp_path / "command.txt", "new\n")
    assert victim.read_text() == SECRET and (tmp_path / "command.txt").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.txt", "home"]


def test_perf_refuses_a_linked_out_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError, match="symbolic link"):
        perf_cli.parse_args(["--out", str(tmp_path / "alias")])
