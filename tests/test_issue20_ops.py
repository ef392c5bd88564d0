"""Issue 20 item 2: the harness's cd train step dispatches a handful of kernels more than
unconstrained (counted, not timed: deterministic), and runs.csv records the weight path."""

import pytest
import torch

from bench import measure
from bench.perf.plan import run_config, shape28_task
from bench.runner import RunConfig, make_steps, run_one

#: kernel-launching operators the constraint may add to one train step (issue 20's target)
MAX_EXTRA_OPS = 14


def _train_ops(method: str) -> int:
    steps = make_steps(run_config(method, 100, 64, "cpu"), shape28_task(64))  # the notebook's shape
    return measure.kernel_op_count(steps.train)


def test_cd_train_step_adds_at_most_14_kernel_ops_to_unconstrained():
    base, cd = _train_ops("unconstrained"), _train_ops("cd")
    assert cd - base <= MAX_EXTRA_OPS, f"cd {cd}, unconstrained {base}"
    assert _train_ops("cd") == cd  # deterministic


def test_the_counter_excludes_views_and_allocations_only():
    x = torch.randn(4, 3)
    counts = measure.count_kernel_ops(
        lambda: (x.t(), x.reshape(-1), torch.empty(3), x.view(3, 4) + 1, x.t().reshape(-1))
    )
    assert dict(counts) == {"aten::add": 1, "aten::clone": 1}  # reshape of a transpose copies


def test_runs_csv_records_the_weight_path():
    cfg = RunConfig(
        method="cd",
        task="digits",
        num_layers=1,
        hidden_size=8,
        bidirectional=False,
        epochs=1,
        batch_size=256,
        penalty_param=0.5,
        perf_iters=1,
        profile="smoke",
    )
    row, _ = run_one(cfg)
    assert row["status"] == "ok", row["error"]
    assert row["weight_path"] == "flat"
    base, _ = run_one(RunConfig(**{**cfg.__dict__, "method": "unconstrained", "penalty_param": None}))
    assert base["weight_path"] == ""


@pytest.mark.parametrize("method", ["unconstrained", "cd"])
def test_the_eval_step_is_counted_too(method):
    steps = make_steps(run_config(method, 8, 2, "cpu"), shape28_task(64))
    assert measure.kernel_op_count(steps.eval) > 0
