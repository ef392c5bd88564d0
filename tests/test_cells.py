"""The cell axis, the orthogonal initialisations, the optimisers and the rename of ``lstm`` (issue 13
items 2-3).

The initialisations are checked against from-scratch references written from their sources
(expRNN's ``create_diag_`` skew matrix and ``torch.linalg.matrix_exp``), the run_ids against the
committed results of 0.1.0 (``results/reference/``), and the acceptance command of issue 13 is run
(on a tiny setting in the fast tier, as written in the slow one).
"""

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import cdcore
from bench import ablate, cells
from bench.cells import CELLS, GATES
from bench.methods import ALIASES, METHODS, canonical
from bench.runner import HISTORY_COLUMNS, RunConfig, build, get_task, run_one, upgrade_row
from bench.store import ResultStore
from bench.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ["--task", "digits", "--profile", "smoke", "--no-progress", "--no-plots"]
TINY = [*DIGITS, "--epochs", "1", "--train-subset", "256", "--hidden", "8"]


def expRNN_skew(size: int, s: torch.Tensor) -> torch.Tensor:
    """expRNN's ``create_diag_``, written out: a size x size skew matrix with s on every other entry
    of its first superdiagonal (A[2i, 2i+1] = s_i), minus its transpose."""
    diag = torch.zeros(size - 1, dtype=torch.float64)
    diag[::2] = s
    A = torch.diag(diag, diagonal=1)
    return A - A.T


def _angles(W: torch.Tensor) -> torch.Tensor:
    """s_i of a block-diagonal W whose 2 x 2 blocks are [[cos s, -sin s], [sin s, cos s]]."""
    i = torch.arange(0, 2 * (W.shape[0] // 2), 2)
    return torch.atan2(W[i + 1, i], W[i, i])


# -- the initialisations ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_rotation_blocks_is_the_transpose_of_expm_of_exprnns_skew_matrix(size):
    s = torch.linspace(-3.0, 3.0, size // 2, dtype=torch.float64)
    W = cells.rotation_blocks(size, s)
    assert torch.allclose(W, torch.linalg.matrix_exp(expRNN_skew(size, s)).T, atol=1e-12)
    assert torch.allclose(W.T @ W, torch.eye(size, dtype=torch.float64), atol=1e-14)
    if size % 2:
        assert W[-1, -1] == 1 and not W[-1, :-1].any() and not W[:-1, -1].any()  # last coordinate fixed


def test_angle_distributions_follow_their_sources():
    g = torch.Generator().manual_seed(0)
    h = cells.henaff_angles(20000, g)
    assert h.min() >= -math.pi and h.max() <= math.pi and abs(h.mean()) < 0.05
    assert h.min() < -3.0 and h.max() > 3.0  # the whole of [-pi, pi]
    c = cells.cayley_angles(20000, g)
    # s = -tan(t / 2), t ~ U[0, pi/2]: s in [-1, 0], E[tan(t / 2)] = 2 ln(2) / pi
    assert c.min() >= -1 and c.max() <= 0 and c.min() < -0.99
    assert c.mean().item() == pytest.approx(-2 * math.log(2) / math.pi, abs=0.01)
    # scoRNN's Cayley transform (I + A)^{-1} (I - A) of the same skew matrix rotates by t ~ U[0, pi/2]
    A = expRNN_skew(4, c[:2])
    eye = torch.eye(4, dtype=torch.float64)
    cay = torch.linalg.solve(eye + A, eye - A)
    t = torch.atan2(cay[[0, 2], [1, 3]].abs(), cay[[0, 2], [0, 2]])
    assert torch.allclose(t, 2 * torch.atan(-c[:2]), atol=1e-12)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("init", ["henaff", "cayley"])
def test_rotation_inits_fill_every_gate_block_with_block_diagonal_rotations(cell, init):
    H = 7
    m = cells.make_plain(cell, 3, H, 2, True, "tanh")
    other = {n: p.detach().clone() for n, p in m.named_parameters() if not n.startswith("weight_hh")}
    cells.initialize(m, init, torch.Generator().manual_seed(1))
    low, high = (-math.pi, math.pi) if init == "henaff" else (-1.0, 0.0)
    drawn = []
    for name in cells.recurrent_names(m):
        W = getattr(m, name).detach().double()
        assert W.shape == (GATES[cell] * H, H)
        for block in W.split(H):
            s = _angles(block)
            assert torch.allclose(block, cells.rotation_blocks(H, s), atol=1e-6)  # float32 weights
            assert s.min() >= low - 1e-6 and s.max() <= high + 1e-6
            drawn.append(s)
    assert len({tuple(s.tolist()) for s in drawn}) == len(drawn)  # independent draws per block
    assert all(torch.equal(p, other[n]) for n, p in m.named_parameters() if n in other)  # only weight_hh


def test_orthogonal_init_is_torchs_orthogonal_per_gate_block_in_flat_weight_order():
    H = 4
    m = cells.make_plain("lstm", 3, H, 2, True, "tanh")
    cells.initialize(m, "orthogonal", torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for name in cells.recurrent_names(m):  # weight_hh_l0, weight_hh_l0_reverse, weight_hh_l1, ...
        want = torch.cat(
            [nn.init.orthogonal_(torch.empty(H, H, dtype=torch.float64), generator=g) for _ in range(4)]
        )
        assert torch.equal(getattr(m, name).detach(), want.float()), name


def test_default_init_changes_nothing_and_draws_nothing():
    m = cells.make_plain("gru", 3, 4, 1, False, "tanh")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    cells.initialize(m, "default", g)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="unknown init 'zeros'; allowed: default, orthogonal"):
        cells.initialize(m, "zeros", g)


def test_make_plain_builds_each_cell_and_the_rnns_nonlinearity():
    for cell, cls in CELLS.items():
        m = cells.make_plain(cell, 3, 4, 2, True, "tanh")
        assert type(m) is cls and m.batch_first and m.bidirectional and m.num_layers == 2
    assert cells.make_plain("rnn", 3, 4, 1, False, "relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="unknown cell 'lstmx'"):
        cells.make_plain("lstmx", 3, 4, 1, False, "tanh")


def test_the_init_is_applied_before_the_method_attaches():
    """A constrained method starts from the projection of the initialised weight (for an RNN with an
    orthogonal init: the initialised weight itself), so the init is not overwritten by the method."""
    cfg = dict(task="digits", cell="rnn", init="henaff", hidden_size=6, num_layers=1, bidirectional=False)
    task = get_task(RunConfig(method="unconstrained", **cfg), None)
    ref, _ = build(RunConfig(method="unconstrained", **cfg), task)
    w0 = ref.rnn.weight_hh_l0.detach()
    for method in METHODS:
        pen = 0.5 if METHODS[method].uses_penalty else None
        _, built = build(RunConfig(method=method, penalty_param=pen, **cfg), task)
        raw = built.weights()["weight_hh_l0"][0].detach()
        assert torch.allclose(raw, w0, atol=1e-5), method


# -- cells through the methods ------------------------------------------------------------------


@pytest.mark.parametrize("cell", list(CELLS))
def test_cd_and_cdopt_compute_the_same_forward_on_every_cell(cell):
    """The cd method (cdcore's class of the cell) and the cdopt method (CDOpt's class of the cell)
    built from one config: same output, and the same penalty, before any step."""
    nonlinearity = "relu" if cell == "rnn" else "tanh"
    cfg = dict(task="digits", cell=cell, nonlinearity=nonlinearity, penalty_param=0.5, hidden_size=5)
    task = get_task(RunConfig(method="cd", **cfg), None)
    cd_model, cd = build(RunConfig(method="cd", **cfg), task)
    ref_model, ref = build(RunConfig(method="cdopt", **cfg), task)
    assert isinstance(
        cd_model.rnn, {"lstm": cdcore.StiefelLSTM, "gru": cdcore.StiefelGRU}.get(cell, cdcore.StiefelRNN)
    )
    assert (
        type(ref_model.rnn).__name__ == {"lstm": "LSTM_cdopt", "gru": "GRU_cdopt", "rnn": "RNN_cdopt"}[cell]
    )
    x = torch.rand(4, 8, task.input_size)
    with torch.no_grad():
        assert torch.allclose(cd_model(x), ref_model(x), atol=1e-5)
    assert cd.penalty().item() == pytest.approx(ref.penalty().item(), abs=1e-6)
    if cell == "rnn":
        assert ref_model.rnn.mode == "RNN_RELU" and cd_model.rnn.nonlinearity == "relu"


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_uses_the_chosen_optimizer_and_the_constrained_learning_rate(method, optimizer):
    cfg = RunConfig(
        method=method,
        task="digits",
        cell="gru",
        hidden_size=4,
        optimizer=optimizer,
        lr=1e-2,
        lr_constrained=1e-3,
        penalty_param=0.5 if METHODS[method].uses_penalty else None,
    )
    model, built = build(cfg, get_task(cfg, None))
    opt = built.optimizer(model)
    want = {
        ("adam", False): torch.optim.Adam,
        ("rmsprop", False): torch.optim.RMSprop,
        ("adam", True): cdcore.optim.CayleyAdam,
        ("rmsprop", True): cdcore.optim.CayleyRMSprop,
    }[optimizer, method == "cayley"]
    assert type(opt) is want
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(model.parameters())) and {id(p) for p in params} == {
        id(p) for p in model.parameters()
    }
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == ([1e-2] if method == "unconstrained" else [1e-2, 1e-3])


def test_rmsprop_trains_every_cell_with_the_cayley_method():
    for cell in CELLS:
        cfg = RunConfig(
            method="cayley",
            task="digits",
            cell=cell,
            optimizer="rmsprop",
            init="cayley",
            profile="smoke",
            **{**TASKS["digits"].profiles["smoke"], "epochs": 2, "lr": 5e-3},
        )
        row, _ = run_one(cfg)
        assert row["status"] == "ok" and row["test_acc"] > 0.5, (cell, row["error"])
        assert row["feasibility_eff"] < METHODS["cayley"].tolerance


# -- the rename of lstm, run_ids, old folders ----------------------------------------------------


def test_lstm_is_an_alias_of_unconstrained_in_code():
    assert ALIASES == {"lstm": "unconstrained"} and canonical("lstm") == "unconstrained"
    assert METHODS["lstm"] is METHODS["unconstrained"] and "lstm" in METHODS
    assert METHODS.get("lstm") is METHODS["unconstrained"]
    assert "lstm" not in list(METHODS) and "unconstrained" in list(METHODS)  # iteration: canonical names
    cfg = RunConfig(method="lstm")
    assert cfg.method == "unconstrained" and cfg == RunConfig(method="unconstrained")


#: run_ids computed by cdbench 0.1.0 (commit 5df5f54, before the cell axis and the rename)
OLD_RUN_IDS = {
    ("lstm", "smoke"): "f767c09b42c6",  # digits, smoke profile, penalty_param None
}


def test_run_ids_of_0_1_0_configurations_are_unchanged():
    p = TASKS["digits"].profiles["smoke"]
    for name in ("lstm", "unconstrained"):
        cfg = RunConfig(method=name, task="digits", profile="smoke", penalty_param=None, **p)
        assert cfg.run_id == OLD_RUN_IDS["lstm", "smoke"]
    base = RunConfig(method="cd", task="digits", penalty_param=0.5)
    changed = [
        RunConfig(method="cd", task="digits", penalty_param=0.5, **{k: v})
        for k, v in [("cell", "gru"), ("init", "henaff"), ("optimizer", "rmsprop"), ("nonlinearity", "relu")]
    ]
    ids = {base.run_id, *(c.run_id for c in changed)}
    assert len(ids) == 5  # a non-default value of a new field is a new configuration
    assert RunConfig.ADDED_FIELDS >= {"cell", "init", "optimizer", "nonlinearity"}


@pytest.mark.parametrize(
    "src",
    [ROOT / "tests" / "data" / "smnist-quick-0.1.0", ROOT / "results" / "reference" / "smnist-paper"],
    ids=["smnist-quick", "smnist-paper"],
)
def test_the_committed_0_1_0_folders_resume_without_rerunning_anything(src, tmp_path, monkeypatch):
    """Re-planning the command of a results folder written by 0.1.0 (rows saying ``lstm``, no
    ``cell`` column) with ``--val-size 0`` (0.1.0 had no validation split) gives exactly its
    run_ids; the store then counts every run as done and brings the rows up to date (method
    ``unconstrained``, cell ``lstm``), keeping every measured value.  The command as written now
    holds out a validation set: other runs, other run_ids, so nothing is wrongly skipped."""
    folder = src.name
    command = (src / "command.txt").read_text()
    argv = next(ln.split("bench.ablate", 1)[1].split() for ln in command.splitlines() if "bench.ablate" in ln)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    old = pd.read_csv(src / "runs.csv")
    today, _, _ = ablate.make_plan(ablate.build_parser().parse_args(argv))
    assert not {c.run_id for c in today} & set(old["run_id"])
    plan, _, _ = ablate.make_plan(ablate.build_parser().parse_args([*argv, "--val-size", "0"]))
    assert {c.run_id for c in plan} == set(old["run_id"])
    out = tmp_path / folder
    out.mkdir()
    for name in ("runs.csv", "history.csv"):
        shutil.copy(src / name, out / name)
    with ResultStore(out) as store:
        assert store.prepare({c.run_id for c in plan}) == set(old["run_id"])
    new = pd.read_csv(out / "runs.csv")
    assert list(new["run_id"]) == list(old["run_id"])
    assert set(new["method"]) == {canonical(m) for m in old["method"]} and "lstm" not in set(new["method"])
    assert (
        (new["cell"] == "lstm").all()
        and (new["optimizer"] == "adam").all()
        and (new["init"] == "default").all()
    )
    assert new["test_acc"].tolist() == old["test_acc"].tolist()
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == HISTORY_COLUMNS and (hist["cell"] == "lstm").all()
    assert len(hist) == len(pd.read_csv(src / "history.csv"))


def test_upgrade_row_leaves_current_rows_alone():
    row = {"run_id": "x", "method": "cd", "cell": "gru", "init": "henaff", "optimizer": "rmsprop"}
    up = upgrade_row(row)
    assert {k: up[k] for k in row} == row and up["nonlinearity"] == "tanh" and up["val_size"] == 0
    assert upgrade_row({"method": "lstm", "cell": ""})["cell"] == "lstm"


# -- the sweep -----------------------------------------------------------------------------------


def test_plan_skips_per_gate_for_the_rnn_and_gives_the_nonlinearity_to_the_rnn_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ablate.build_parser().parse_args(
        [
            *DIGITS,
            "--methods",
            "lstm",
            "cd",
            "--cell",
            "lstm",
            "rnn",
            "--granularity",
            "stacked",
            "per_gate",
            "--nonlinearity",
            "tanh",
            "relu",
            "--init",
            "default",
            "henaff",
            "--optimizer",
            "rmsprop",
        ]
    )
    plan, notices, _ = ablate.make_plan(args)
    assert any("cell rnn skipped for granularity per_gate: a vanilla rnn has no gates" in n for n in notices)
    got = {(c.method, c.cell, c.granularity, c.nonlinearity, c.init) for c in plan}
    lstm = {
        (m, "lstm", g, "tanh", i)
        for m in ("unconstrained", "cd")
        for g in ("stacked", "per_gate")
        for i in ("default", "henaff")
    }
    rnn = {
        (m, "rnn", "stacked", n, i)
        for m in ("unconstrained", "cd")
        for n in ("tanh", "relu")
        for i in ("default", "henaff")
    }
    assert got == lstm | rnn and len(plan) == len(got)
    assert {c.optimizer for c in plan} == {"rmsprop"}


def test_plan_prints_the_cell_and_the_non_default_recipe(tmp_path, capsys):
    out = tmp_path / "o"
    args = [*TINY, "--methods", "lstm", "--cell", "rnn", "--nonlinearity", "relu", "--init", "cayley"]
    assert ablate.main([*args, "--optimizer", "rmsprop", "--lr-constrained", "1e-3", "--out", str(out)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  run "))
    assert "unconstrained" in line and "rnn(relu)" in line and "init=cayley" in line
    assert "optimizer=rmsprop" in line and "lr_constrained=0.001" in line
    runs = pd.read_csv(out / "runs.csv")
    assert runs.loc[0, ["method", "cell", "nonlinearity", "init", "optimizer"]].tolist() == [
        "unconstrained",
        "rnn",
        "relu",
        "cayley",
        "rmsprop",
    ]


def _acceptance(argv, tmp_path):
    out = tmp_path / "o"
    assert ablate.main([*argv, "--cell", "lstm", "gru", "rnn", "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    available = [m for m in METHODS if METHODS[m].available()]
    assert {(m, c) for m, c in zip(runs["method"], runs["cell"])} == {
        (m, c) for m in available for c in CELLS
    }
    assert (runs["status"] == "ok").all() and runs["run_id"].is_unique
    hist = pd.read_csv(out / "history.csv")
    assert set(zip(hist["run_id"], hist["cell"])) == set(zip(runs["run_id"], runs["cell"]))
    return out, runs


def test_every_method_runs_on_every_cell_tiny(tmp_path):
    """Issue 13's acceptance command on a tiny setting (one epoch of 256 digits, hidden 8)."""
    _acceptance(TINY, tmp_path)


@pytest.mark.slow(
    reason="issue 13's acceptance command as written: 18 runs of the digits smoke profile and plots"
)
def test_issue_13_acceptance_command(tmp_path):
    """``python -m bench.ablate --profile smoke --task digits --cell lstm gru rnn --out <tmp>``."""
    out, runs = _acceptance(["--profile", "smoke", "--task", "digits", "--no-progress"], tmp_path)
    assert (runs["test_acc"] > 0.8).all(), runs[["method", "cell", "test_acc"]]
    for m in runs["method"].unique():
        for c in CELLS:
            assert (out / f"confusion_{m}_{c}.png").is_file()
    summary = (out / "summary.md").read_text()
    header = next(ln for ln in summary.splitlines() if ln.startswith("| method"))
    assert "| cell" in header and "| gru " in summary and "| rnn " in summary  # a column per configuration
    assert (out / "metric_vs_cell.png").stat().st_size > 1000  # the cell drawn as a swept axis


def test_readme_sweep_commands_parse_and_plan(monkeypatch):
    """Every ``python -m bench.ablate`` command of the README (its recipes included) uses flags that
    exist with values they accept, and plans at least one run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    commands = [
        ln.split("#")[0].split("python -m bench.ablate", 1)[1]
        for ln in lines
        if ln.startswith("python -m bench.ablate")
    ]
    assert len(commands) >= 5
    for cmd in commands:
        args = ablate.build_parser().parse_args(cmd.split())
        if args.list_methods:
            continue
        plan, _, _ = ablate.make_plan(args)
        assert plan, cmd
