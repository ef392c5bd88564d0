"""Tasks: the data, output head shape, loss and metric of each benchmark problem.

Every task yields batch-first float32 sequences ``x`` of shape (N, T, F).  The harness
asks a task only for batches, a loss and a metric; it knows nothing else about it.

* ``smnist``  row-wise sequential MNIST: 28 steps of 28 pixels in [0, 1]; train on the
  60,000 training images, score all 10,000 test images.
* ``digits``  scikit-learn's bundled 8 x 8 digits: 8 steps of 8 features in [0, 1], a
  fixed stratified 80/20 split (seed 0); needs no files and no network.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataError(RuntimeError):
    """Data could not be found or read; the message is one line meant for the user."""


@dataclass
class Task:
    """One benchmark problem.

    Attributes
    ----------
    name : str
    input_size : int
        Features per time step F.
    output_size : int
        Classes (classification, copying) or outputs (regression).
    per_step : bool
        True when the head is applied at every time step (copying), else at the last.
    metric : {"acc", "ce", "mse"}
        The headline test metric; ``higher_is_better`` says which way is good.
    baseline : float or None
        A reference value of the metric (e.g. a memoryless solution), drawn on plots.
    train : (Tensor, Tensor) or None
        In-memory training inputs (N, T, F) and targets; None for generated tasks.
    test : (Tensor, Tensor)
        Fixed test inputs and targets.
    generate : callable or None
        ``generate(n, generator) -> (x, y)`` for tasks generated on the fly.
    batches_per_epoch : int
        For generated tasks: batches in one training epoch.
    """

    name: str
    input_size: int
    output_size: int
    metric: str
    test: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor] | None = None
    per_step: bool = False
    baseline: float | None = None
    generate: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None
    batches_per_epoch: int = 0
    info: dict = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"

    @property
    def seq_len(self) -> int:
        return int(self.test[0].shape[1])

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0]) if self.train is not None else self.batches_per_epoch

    @property
    def n_test(self) -> int:
        return int(self.test[0].shape[0])

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of training batches, shuffled by ``generator`` (CPU tensors)."""
        if self.train is not None:
            x, y = self.train
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], batch_size):
                idx = order[start:start + batch_size]
                yield x[idx], y[idx]
        else:
            for _ in range(self.batches_per_epoch):
                yield self.generate(batch_size, generator)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole test set, in order, in batches of ``batch_size``."""
        x, y = self.test
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean loss of a batch: cross-entropy (acc, ce tasks) or mean squared error."""
        if self.metric == "mse":
            return F.mse_loss(out.squeeze(-1), y)
        if self.per_step:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    def score(self, out: Tensor, y: Tensor) -> Tensor:
        """Sum over the batch of the metric's numerator (correct count, or summed loss)."""
        if self.metric == "acc":
            return (out.argmax(-1) == y).sum()
        return self.loss(out, y).detach() * y.shape[0]

    def predictions(self, out: Tensor) -> Tensor | None:
        return out.argmax(-1) if self.metric == "acc" else None


# --------------------------------------------------------------------------------------
# MNIST from disk (torchvision), plain or .gz, decompressed into a writable cache


def cache_dir() -> Path:
    """Writable cache: $BENCH_CACHE_DIR, else $XDG_CACHE_HOME/cdbench, else ~/.cache/cdbench."""
    if os.environ.get("BENCH_CACHE_DIR"):
        return Path(os.environ["BENCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdbench"


def default_data_dir() -> str:
    return os.environ.get("BENCH_DATA_DIR") or "./data"


def _mnist_root(data_dir: str | os.PathLike) -> Path:
    """A root that ``torchvision.datasets.MNIST(root)`` can read, decompressing if needed."""
    data_dir = Path(data_dir)
    raw = data_dir / "MNIST" / "raw"
    if all((raw / f).is_file() for f in MNIST_FILES):
        return data_dir
    if all((raw / (f + ".gz")).is_file() for f in MNIST_FILES):
        from torchvision.datasets.utils import extract_archive

        key = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
        root = cache_dir() / "mnist" / key
        out = root / "MNIST" / "raw"
        out.mkdir(parents=True, exist_ok=True)
        for f in MNIST_FILES:
            if not (out / f).is_file():
                # decompress into a private folder, then rename: an interrupted run never
                # leaves a truncated file where torchvision would read it
                tmp = Path(tempfile.mkdtemp(dir=out, prefix=".extract-"))
                extract_archive(str(raw / (f + ".gz")), str(tmp))
                os.replace(tmp / f, out / f)
                shutil.rmtree(tmp, ignore_errors=True)
        return root
    return None


def load_mnist_tensors(data_dir: str | os.PathLike) -> dict[str, Tensor]:
    """Train/test images (uint8, (N, 28, 28)) and labels (int64) read by torchvision.

    Raises
    ------
    DataError
        If the four IDX files (plain or .gz) are not under ``<data_dir>/MNIST/raw`` and
        torchvision cannot download them.
    """
    from torchvision.datasets import MNIST

    root = _mnist_root(data_dir)
    if root is None:
        try:
            MNIST(str(data_dir), train=True, download=True)
            MNIST(str(data_dir), train=False, download=True)
            root = Path(data_dir)
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(
                f"MNIST not found under --data-dir {data_dir!s} (expected MNIST/raw/*-ubyte[.gz]) and the "
                f"download failed ({type(exc).__name__}); point --data-dir or BENCH_DATA_DIR at the files, "
                f"or use the offline task 'digits'"
            ) from None
    train = MNIST(str(root), train=True, download=False)
    test = MNIST(str(root), train=False, download=False)
    return {"train_x": train.data, "train_y": train.targets, "test_x": test.data, "test_y": test.targets}


_MNIST_CACHE: dict[str, dict[str, Tensor]] = {}


def _mnist(data_dir) -> dict[str, Tensor]:
    key = str(Path(data_dir).resolve())
    if key not in _MNIST_CACHE:
        _MNIST_CACHE[key] = load_mnist_tensors(data_dir)
    return _MNIST_CACHE[key]


def _subset(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if n is None or n >= x.shape[0] else (x[:n], y[:n])


def smnist(data_dir, train_subset=None, test_subset=None, **_) -> Task:
    d = _mnist(data_dir)
    tr = _subset(d["train_x"].float().div_(255), d["train_y"], train_subset)
    te = _subset(d["test_x"].float().div_(255), d["test_y"], test_subset)
    return Task("smnist", 28, 10, "acc", train=tr, test=te)


def digits(train_subset=None, test_subset=None, **_) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32) / 16.0  # (1797, 8, 8), values 0..16
    y = torch.tensor(ds.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=ds.target)
    tr = _subset(x[idx_tr], y[idx_tr], train_subset)
    te = _subset(x[idx_te], y[idx_te], test_subset)
    return Task("digits", 8, 10, "acc", train=tr, test=te)


#: name -> loader(data_dir=..., train_subset=..., test_subset=..., seq_len=...) -> Task
TASKS: dict[str, Callable[..., Task]] = {
    "smnist": smnist,
    "digits": lambda data_dir=None, **kw: digits(**kw),
}


def load_task(name: str, **kwargs) -> Task:
    """Build task ``name``; keyword arguments: data_dir, train_subset, test_subset, seq_len."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


def memoryless_copying_baseline(seq_len: int, n_symbols: int = 10, n_categories: int = 8) -> float:
    """Cross-entropy of the memoryless strategy for the copying task (Arjovsky et al. 2016)."""
    return n_symbols * math.log(n_categories) / (seq_len + 2 * n_symbols)


__all__ = ["DataError", "TASKS", "Task", "default_data_dir", "load_mnist_tensors", "load_task"]


#: Per-task overrides of the sweep profiles: TASK_PROFILES[task][profile] -> {RunConfig field: value}.
#: bench.ablate applies these on top of its generic profile values (explicit flags win).
TASK_PROFILES: dict[str, dict[str, dict]] = {}
