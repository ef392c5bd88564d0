"""The long-sequence tasks: psmnist, pmnist, copying, adding (bench.tasks)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import tasks
from bench.runner import RunConfig, run_one

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny LSTMs over hundreds of steps: a second OpenMP thread only adds contention
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_copying_batch_layout():
    T, n = 7, 5
    x, y = tasks.copying_batch(n, torch.Generator().manual_seed(0), T)
    assert x.shape == (n, T + 20, 10) and x.dtype == torch.float32
    assert y.shape == (n, T + 20) and y.dtype == torch.int64
    assert torch.equal(x.sum(-1), torch.ones(n, T + 20))  # one-hot
    tok = x.argmax(-1)
    symbols = tok[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (tok[:, 10 : T + 9] == 0).all() and (tok[:, T + 9] == 9).all() and (tok[:, T + 10 :] == 0).all()
    assert (y[:, : T + 10] == 0).all()
    assert torch.equal(y[:, T + 10 :], symbols)  # the target really is the input symbols
    assert int(y.max()) <= 8


def test_copying_task():
    task = tasks.load_task("copying", seq_len=30, test_subset=50, train_subset=3)
    assert (task.input_size, task.output_size, task.metric, task.per_step) == (10, 9, "ce", True)
    assert task.test[0].shape == (50, 50, 10) and task.n_test == 50 and task.batches_per_epoch == 3
    assert task.baseline == pytest.approx(10 * math.log(8) / 50)
    assert tasks.load_task("copying").baseline == pytest.approx(10 * math.log(8) / 1020)
    # the fixed test set is reproducible and test_subset keeps its prefix
    full = tasks.load_task("copying", seq_len=30)
    assert full.n_test == 1000 and torch.equal(full.test[0][:50], task.test[0])
    assert len(list(task.train_batches(4, torch.Generator().manual_seed(1)))) == 3


def test_adding_batch():
    T, n = 11, 200
    x, y = tasks.adding_batch(n, torch.Generator().manual_seed(0), T)
    assert x.shape == (n, T, 2) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.float32
    v, m = x[..., 0], x[..., 1]
    assert ((v >= 0) & (v <= 1)).all()
    assert (m[:, : T // 2].sum(1) == 1).all() and (m[:, T // 2 :].sum(1) == 1).all()
    assert torch.allclose((v * m).sum(1), y)


def test_adding_task():
    task = tasks.load_task("adding", seq_len=40, test_subset=100)
    assert (task.input_size, task.output_size, task.metric, task.per_step) == (2, 1, "mse", False)
    assert task.test[0].shape == (100, 40, 2) and task.batches_per_epoch == 100
    assert task.baseline == pytest.approx(1 / 6) and round(task.baseline, 3) == 0.167
    assert tasks.load_task("adding").seq_len == 750
    # the baseline is the MSE of always answering 1
    y = tasks.load_task("adding", seq_len=40).test[1]
    assert task.loss(torch.ones(len(y), 1), y).item() == pytest.approx(1 / 6, abs=0.02)


def test_permutation_is_fixed():
    perm = tasks.pmnist_permutation()
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(784))
    assert torch.equal(perm, tasks.pmnist_permutation())
    code = "from bench.tasks import pmnist_permutation; print(pmnist_permutation().tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == str(perm.tolist())


def test_pixel_mnist_shapes_and_permutation(mnist_dir):
    ps = tasks.load_task("psmnist", data_dir=mnist_dir, train_subset=100, test_subset=50)
    pm = tasks.load_task("pmnist", data_dir=mnist_dir, train_subset=100, test_subset=50)
    for t in (ps, pm):
        assert (t.input_size, t.output_size, t.metric) == (1, 10, "acc")
        assert t.train[0].shape == (100, 784, 1) and t.test[0].shape == (50, 784, 1)
        assert t.train[0].dtype == torch.float32 and t.train[1].dtype == torch.int64
        assert 0 <= t.train[0].min() and t.train[0].max() <= 1
    imgs = tasks._mnist(mnist_dir)
    assert torch.equal(ps.test[0][:, :, 0], imgs["test_x"][:50].reshape(50, 784).float() / 255)
    perm = tasks.pmnist_permutation()
    for split in ("train", "test"):  # one permutation for both splits
        assert torch.equal(getattr(pm, split)[0], getattr(ps, split)[0][:, perm])
        assert torch.equal(getattr(pm, split)[1], getattr(ps, split)[1])


@pytest.mark.parametrize("task", ["psmnist", "pmnist", "copying", "adding"])
@pytest.mark.parametrize("method", ["lstm", "cd"])
def test_smoke_run(task, method, request):
    data_dir = request.getfixturevalue("mnist_dir") if task.endswith("mnist") else None
    prof = dict(tasks.TASKS[task].profiles["smoke"])
    if task.endswith("mnist"):
        prof.update(train_subset=64, test_subset=64)
    cfg = RunConfig(method=method, task=task, penalty_param=0.5 if method == "cd" else None, **prof)
    row, history = run_one(cfg, data_dir=data_dir)
    assert row["status"] == "ok", row.get("error")
    assert math.isfinite(row["test_metric"]) and sum(h["kind"] == "epoch" for h in history) == cfg.epochs
    assert row["metric"] == {"copying": "ce", "adding": "mse"}.get(task, "acc")


def test_profiles_complete():
    for name, spec in tasks.TASKS.items():
        assert set(spec.profiles) == set(tasks.PROFILES), name
        for prof, p in spec.profiles.items():
            # each profile sets every common field and the task's own options, nothing else
            assert set(p) == {*tasks.PROFILE_FIELDS, *spec.options}, (name, prof)
            RunConfig(method="lstm", task=name, **p)  # every key is a RunConfig field
            if name in ("psmnist", "pmnist", "copying", "adding"):
                assert p["num_layers"] == 1 and p["bidirectional"] is False
    assert tasks.TASKS["copying"].profiles["paper"]["seq_len"] == 1000
    assert tasks.TASKS["copying"].profiles["paper"]["hidden_size"] == 190
    assert tasks.TASKS["adding"].profiles["paper"]["seq_len"] == 750
    assert tasks.TASKS["smnist"].profiles["paper"] == dict(
        num_layers=2,
        hidden_size=100,
        bidirectional=True,
        epochs=10,
        batch_size=64,
        lr=5e-4,
        train_subset=None,
        test_subset=None,
        perf_iters=50,
    )  # the reference notebook


@pytest.mark.parametrize(
    "task,option",
    [("digits", "seq_len"), ("smnist", "seq_len"), ("copying", "seqlen"), ("adding", "train_subsets")],
)
def test_unknown_task_option_raises_naming_it_and_the_allowed(task, option):
    with pytest.raises(ValueError, match=f"task '{task}' takes no option '{option}'; allowed: train_subset"):
        tasks.load_task(task, **{option: 10})
