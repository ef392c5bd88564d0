"""The validation split of every task (issue 12, item 1): where it comes from, that it is
disjoint from the training and test sets, and that ``val_size=0`` gives back the task as it
was before the split existed."""

import pytest
import torch

from bench import tasks
from bench.runner import data_seed


def _rows(x: torch.Tensor) -> set[bytes]:
    """Each example of ``x`` (first dimension) as bytes: equal examples, equal bytes."""
    return {r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)}


def test_mnist_holds_out_the_last_5000_training_images(mnist_dir):
    raw = tasks.load_mnist_tensors(mnist_dir)
    task = tasks.load_task("smnist", data_dir=mnist_dir)
    assert (task.n_train, task.n_val, task.n_test) == (55_000, 5_000, 10_000)
    idx_tr, idx_val = tasks.mnist_split_indices(60_000, 5_000)
    assert not set(idx_tr.tolist()) & set(idx_val.tolist())  # disjoint by index
    assert set(idx_tr.tolist()) | set(idx_val.tolist()) == set(range(60_000))
    assert torch.equal(idx_val, torch.arange(55_000, 60_000))  # the last 5,000
    assert torch.equal(task.val[0], raw["train_x"][55_000:].float() / 255)
    assert torch.equal(task.val[1], raw["train_y"][55_000:])
    assert torch.equal(task.train[0], raw["train_x"][:55_000].float() / 255)
    assert torch.equal(task.test[0], raw["test_x"].float() / 255)  # the test file, untouched
    # train_subset applies to the images left for training: never to a validation image
    sub = tasks.load_task("smnist", data_dir=mnist_dir, train_subset=1000, val_size=59_500)
    assert sub.n_train == 500 and torch.equal(sub.train[0], raw["train_x"][:500].float() / 255)
    # a profile that scores part of the test set validates on no more images than it tests on
    small = tasks.load_task("smnist", data_dir=mnist_dir, train_subset=64, test_subset=64)
    assert small.n_val == 64 and torch.equal(small.val[1], raw["train_y"][-64:])


def test_mnist_val_size_zero_is_the_old_task(mnist_dir):
    raw = tasks.load_mnist_tensors(mnist_dir)
    task = tasks.load_task("smnist", data_dir=mnist_dir, train_subset=None, val_size=0)
    assert task.val is None and task.n_train == 60_000
    assert torch.equal(task.train[1], raw["train_y"])
    pixels = tasks.load_task("pmnist", data_dir=mnist_dir, train_subset=100, test_subset=10, val_size=0)
    assert pixels.val is None and torch.equal(pixels.train[1], raw["train_y"][:100])


def test_digits_validation_is_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    target = load_digits().target
    idx_tr, idx_val, idx_te = tasks.digits_split_indices()
    assert (len(idx_tr), len(idx_val), len(idx_te)) == (1077, 360, 360)
    assert not set(idx_tr) & set(idx_val) and not set(idx_val) & set(idx_te) and not set(idx_tr) & set(idx_te)
    assert set(idx_tr) | set(idx_val) | set(idx_te) == set(range(1797))
    # stratified: every class holds 20 % (+- 1 digit) of its training-split digits out
    for c in range(10):
        in_split = (target[[*idx_tr, *idx_val]] == c).sum()
        assert abs((target[idx_val] == c).sum() - 360 * in_split / 1437) <= 1
    task = tasks.load_task("digits")
    x = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    assert torch.equal(task.val[0], x[idx_val]) and torch.equal(task.train[0], x[idx_tr])
    assert torch.equal(task.test[0], x[idx_te])
    # the test split does not depend on the validation split
    _, _, idx_te0 = tasks.digits_split_indices(0)
    assert idx_te0 == idx_te


def test_digits_val_size_zero_is_the_old_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    old_tr, old_te = train_test_split(
        range(len(ds.target)), test_size=0.2, random_state=0, stratify=ds.target
    )
    task = tasks.load_task("digits", val_size=0)
    x = torch.tensor(ds.images, dtype=torch.float32) / 16.0
    assert task.val is None
    assert torch.equal(task.train[0], x[list(old_tr)]) and torch.equal(task.test[0], x[list(old_te)])


@pytest.mark.parametrize("name", ["copying", "adding"])
def test_generated_validation_is_disjoint_by_content_and_fixed(name):
    task = tasks.load_task(name, seq_len=20, test_subset=300)
    assert task.n_val == task.n_test == 300  # default: as large as the test set
    val, test = _rows(task.val[0]), _rows(task.test[0])
    assert len(val) == 300 and not val & test
    for epoch in range(2):  # the training stream of two epochs of a run
        gen = torch.Generator().manual_seed(data_seed(_Cfg(), epoch))
        for x, _ in task.train_batches(64, gen):
            assert not _rows(x) & val
    # fixed: the same in every load; its first k sequences do not depend on the size asked for
    again = tasks.load_task(name, seq_len=20, test_subset=300, val_size=50)
    assert torch.equal(again.val[0], task.val[0][:50]) and torch.equal(again.val[1], task.val[1][:50])
    assert tasks.load_task(name, seq_len=20, val_size=0).val is None


class _Cfg:
    """The fields data_seed reads."""

    seed, task, train_subset, seq_len = 0, "copying", None, 20


@pytest.mark.parametrize(
    "name,val_size,message",
    [
        ("digits", 1437, "val_size must be in 0..1436"),
        ("digits", -1, "val_size must be in 0..1436"),
        ("adding", -5, "val_size must be a non-negative integer"),
    ],
)
def test_bad_val_size_is_refused(name, val_size, message):
    with pytest.raises(ValueError, match=message):
        tasks.load_task(name, val_size=val_size)


def test_every_task_declares_a_target_per_profile():
    for name, spec in tasks.TASKS.items():
        assert set(spec.targets) == set(tasks.PROFILES), name
    copy = tasks.load_task("copying", seq_len=100, test_subset=8)
    assert tasks.TASKS["copying"].target("quick", copy) == pytest.approx(
        0.1 * tasks.memoryless_copying_baseline(100)
    )
    assert tasks.TASKS["adding"].target("paper", None) == 0.01
    assert tasks.TASKS["digits"].target("custom", None) is None
