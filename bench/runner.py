"""One run: build the model for a method, train it, evaluate it, measure it.

A run is described by a :class:`RunConfig`; its ``run_id`` is a hash of every field,
so the same configuration always has the same id.  :func:`run_one` returns the run's
row for ``runs.csv`` and its rows for ``history.csv``; it never writes them (the sweep
driver does, so any executor can run it).  Every key of those rows is a column:
:data:`RUN_COLUMNS` (the RunConfig fields, :data:`MEASURED_COLUMNS` and
:data:`PROVENANCE_COLUMNS`) and :data:`HISTORY_COLUMNS`.

The trainer knows no method: it asks the method's :class:`bench.methods.Built` for the
optimiser, the penalty, the recurrent weights, the projected plain module and the
optimiser's counters, and ``Method.constrained`` for whether feasibility can explode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from cdcore import weight_feasibility

from . import measure
from .errors import Diverged
from .methods import METHODS, Built, Method
from .tasks import TASKS, Task, load_task

__all__ = [
    "HISTORY_COLUMNS",
    "MEASURED_COLUMNS",
    "PROVENANCE_COLUMNS",
    "RUN_COLUMNS",
    "Checkpoint",
    "RunConfig",
    "SeqModel",
    "Steps",
    "Training",
    "build",
    "derive_seed",
    "evaluate",
    "final_metrics",
    "make_steps",
    "measure_throughput",
    "run_one",
    "start_training",
    "train_epoch",
]

#: feasibility ||W^T W - I||_F above which a constrained run counts as diverged
FEASIBILITY_EXPLODED = 1e3


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run (all of it enters ``run_id``)."""

    method: str
    task: str = "smnist"
    seed: int = 0
    num_layers: int = 2
    hidden_size: int = 100
    bidirectional: bool = True
    granularity: str = "stacked"
    penalty_param: float | None = None  # only for methods that use a penalty
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    lr_constrained: float | None = None  # None: same as lr
    device: str = "cpu"
    profile: str = "custom"
    train_subset: int | None = None  # None: the whole training set
    test_subset: int | None = None  # None: the whole test set
    seq_len: int | None = None  # tasks with the seq_len option only
    perf_iters: int = 20  # timed steps for the throughput figures

    @property
    def run_id(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


#: what run_one measures and reports besides the configuration, in runs.csv order
MEASURED_COLUMNS = [
    "status",
    "error",
    "diverged_epoch",
    "metric",
    "baseline",
    "test_metric",
    "test_metric_projected",
    "test_acc",
    "test_acc_projected",
    "train_loss",
    "feasibility_raw",
    "feasibility_eff",
    "recurrent_change",
    "reprojections",
    "train_samples_per_s",
    "eval_samples_per_s",
    "train_step_ms",
    "constraint_share",
    "peak_mem_mb",
    "param_count",
    "n_train",
    "n_test",
    "train_s",
    "wall_s",
    "resumed_from_epoch",
]
#: where and with what the run ran (added by the executors and the sweep driver)
PROVENANCE_COLUMNS = [
    "executor",
    "worker",
    "host",
    "device_name",
    "torch_version",
    "git_commit",
    "packing",  # how the run was packed: "cpu 2x1" = 2 concurrent runs x 1 torch thread (bench.packing)
    "threads",  # torch threads of the run's process
    "timing_exclusive",  # True: the throughput columns were measured holding the machine's timing gate
]
#: every column of runs.csv; the test confusion matrix (JSON) comes last, being the widest
RUN_COLUMNS = [
    "run_id",
    *(f.name for f in fields(RunConfig)),
    *MEASURED_COLUMNS,
    *PROVENANCE_COLUMNS,
    "confusion",
]
#: every column of history.csv (one row per run per epoch)
HISTORY_COLUMNS = [
    "run_id",
    "method",
    "task",
    "seed",
    "penalty_param",
    "epoch",
    "step",
    "train_loss",
    "train_metric",
    "metric",
    "test_metric",
    "test_acc",
    "feasibility_raw",
    "feasibility_eff",
    "epoch_s",
    "train_wall_s",
]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def init_seed(cfg: RunConfig) -> int:
    """Seed of the initial weights: independent of the method, so all methods start alike."""
    return derive_seed(
        "init", cfg.seed, cfg.task, cfg.num_layers, cfg.hidden_size, cfg.bidirectional, cfg.seq_len
    )


def data_seed(cfg: RunConfig, epoch: int) -> int:
    """Seed of the training-batch order in ``epoch`` (independent of the method)."""
    return derive_seed("data", cfg.seed, cfg.task, epoch, cfg.train_subset, cfg.seq_len)


class SeqModel(nn.Module):
    """The notebook's model: a recurrent module, then a Linear head on the last time step
    (or on every step for per-step tasks)."""

    def __init__(
        self, rnn: nn.Module, head: nn.Linear, per_step: bool = False, context=contextlib.nullcontext
    ):
        super().__init__()
        self.rnn, self.head, self.per_step = rnn, head, per_step
        self._context = context

    def forward(self, x):
        with self._context():
            out, _ = self.rnn(x)
        return self.head(out if self.per_step else out[:, -1])


_TASK_CACHE: dict[tuple, Task] = {}


def task_options(cfg: RunConfig) -> dict:
    """The loader options of ``cfg.task`` taken from ``cfg`` (subsets, and the task's own)."""
    spec = TASKS[cfg.task]
    return {
        "train_subset": cfg.train_subset,
        "test_subset": cfg.test_subset,
        **{k: getattr(cfg, k) for k in spec.options},
    }


def get_task(cfg: RunConfig, data_dir) -> Task:
    """The task of ``cfg`` (the last one loaded is kept: a sweep runs many configs of one task)."""
    options = task_options(cfg)
    key = (cfg.task, str(data_dir), *sorted(options.items()))
    if key not in _TASK_CACHE:
        _TASK_CACHE.clear()
        _TASK_CACHE[key] = load_task(cfg.task, data_dir=data_dir, **options)
    return _TASK_CACHE[key]


def build(cfg: RunConfig, task: Task) -> tuple[SeqModel, Built]:
    """The model of ``cfg.method``, from the method-independent initial weights of the seed."""
    torch.manual_seed(init_seed(cfg))
    lstm = nn.LSTM(
        task.input_size, cfg.hidden_size, cfg.num_layers, batch_first=True, bidirectional=cfg.bidirectional
    )
    head = nn.Linear(cfg.hidden_size * (2 if cfg.bidirectional else 1), task.output_size)
    device = torch.device(cfg.device)
    lstm, head = lstm.to(device), head.to(device)
    built = METHODS[cfg.method].build(lstm, cfg)
    return SeqModel(built.rnn, head, task.per_step, built.context), built


def feasibility(built: Built, granularity: str) -> tuple[float, float]:
    """Max over recurrent weights of ||C(W)||_F for the raw and the effective weights."""
    with torch.no_grad():
        ws = built.weights()
        raw = max(weight_feasibility(r, granularity) for r, _ in ws.values())
        eff = max(weight_feasibility(e, granularity) for _, e in ws.values())
    return raw, eff


def effective_weights(built: Built) -> dict[str, Tensor]:
    """A detached copy of every effective recurrent weight (what the forward uses)."""
    with torch.no_grad():
        return {n: e.detach().clone() for n, (_, e) in built.weights().items()}


def recurrent_change(start: dict[str, Tensor], built: Built) -> float:
    """Min over recurrent weights of ||E - E_0||_F / ||E_0||_F, E the effective weight now
    and E_0 at the start of the run: 0 when some recurrent weight never moved."""
    now = effective_weights(built)
    return min(
        float(torch.linalg.norm((now[n] - w0).double()) / torch.linalg.norm(w0.double()))
        for n, w0 in start.items()
    )


def projected_model(model: SeqModel, built: Built) -> SeqModel:
    """The model with its recurrent module replaced by ``built.project()`` (a plain module
    whose recurrent weights are exactly on the manifold); the head is copied."""
    return SeqModel(built.project(), copy.deepcopy(model.head), model.per_step)


def evaluate(model: SeqModel, task: Task, device, batch_size: int = 1000, with_predictions=False):
    """Test metric over the whole test set (accuracy in [0, 1], or mean loss)."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    with torch.no_grad():
        for x, y in task.test_batches(batch_size):
            x, y = x.to(device), y.to(device)
            out = model(x)
            total += task.score(out, y).double()
            if with_predictions and task.metric == "acc":
                preds.append(out.argmax(-1).cpu())
    model.train()
    value = total.item() / task.n_test
    return (value, torch.cat(preds) if preds else None) if with_predictions else value


# ---------------------------------------------------------------------------------------
# Throughput


@dataclass
class Steps:
    """The timed units of a configuration, on a fixed batch already on the device."""

    train: Callable[[], None]  # forward, loss (+ penalty), backward, optimiser step
    eval: Callable[[], None]  # no-grad forward in eval mode
    constraint: Callable[[], None] | None  # the constraint's own work (see bench.methods)
    batch_size: int


def make_steps(cfg: RunConfig, task: Task) -> Steps:
    """Build a fresh model of ``cfg`` and the step functions that the harness's throughput
    columns and ``nox -s perf`` time (data loading excluded: the batch is moved first)."""
    model, built = build(cfg, task)
    opt = built.optimizer(model)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(derive_seed("perf", cfg.seed))
    x, y = next(task.train_batches(cfg.batch_size, gen))
    x, y = x.to(device), y.to(device)

    def train_step():
        model.train()
        out = model(x)
        loss = task.loss(out, y)
        if built.penalty is not None:
            loss = loss + built.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step():
        model.eval()
        with torch.no_grad():
            model(x)

    return Steps(train_step, eval_step, built.constraint_work, int(x.shape[0]))


def measure_throughput(cfg: RunConfig, task: Task, warmup: int = 3) -> dict:
    """Train and eval samples/s of a fresh model of ``cfg`` and the constraint's share.

    Warm-up steps are discarded; CUDA is synchronised before each clock read
    (:func:`bench.measure.time_fn`).  ``constraint_share`` is the time of the
    constraint's own work (map and penalty with their backward, the retraction, or the
    trivialisation) divided by the time of the whole train step.  These are one run's
    absolute figures, unpaired; for a relative cost quote the paired ratio
    (``python -m bench.perf --paired``, docs/perf.md).
    """
    steps = make_steps(cfg, task)
    sync = measure.synchronizer(cfg.device)
    t_train = measure.time_fn(steps.train, warmup=warmup, iters=cfg.perf_iters, sync=sync)
    t_eval = measure.time_fn(steps.eval, warmup=warmup, iters=cfg.perf_iters, sync=sync)
    share = 0.0
    if steps.constraint is not None:
        t_c = measure.time_fn(steps.constraint, warmup=warmup, iters=cfg.perf_iters, sync=sync)
        share = t_c.seconds_per_iter / t_train.seconds_per_iter
    return {
        "train_samples_per_s": steps.batch_size / t_train.seconds_per_iter,
        "eval_samples_per_s": steps.batch_size / t_eval.seconds_per_iter,
        "train_step_ms": 1e3 * t_train.seconds_per_iter,
        "constraint_share": share,
    }


# ---------------------------------------------------------------------------------------
# Training: the named steps that run_one composes


@dataclass
class Training:
    """The state of one run's training (what a checkpoint saves, and what it needs)."""

    cfg: RunConfig
    task: Task
    method: Method
    model: SeqModel
    built: Built
    optimizer: torch.optim.Optimizer
    device: torch.device
    start_weights: dict[str, Tensor]  # effective recurrent weights before any step
    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    elapsed: float = 0.0  # seconds of training so far (evaluation excluded)
    history: list[dict] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        t = self.task
        return math.ceil(t.n_train / self.cfg.batch_size) if t.train is not None else t.batches_per_epoch


def start_training(cfg: RunConfig, task: Task) -> Training:
    """A fresh model of ``cfg`` with its optimiser, before any step."""
    model, built = build(cfg, task)
    return Training(
        cfg,
        task,
        METHODS[cfg.method],
        model,
        built,
        built.optimizer(model),
        torch.device(cfg.device),
        effective_weights(built),
    )


def train_epoch(tr: Training, progress=None) -> dict:
    """One epoch of training, then the test metric and feasibility: appends the epoch's
    ``history.csv`` row to ``tr.history`` and returns it.

    Raises
    ------
    bench.errors.Diverged
        Non-finite loss (checked every 50 steps and at the end), non-finite test metric,
        or, for a constrained method, feasibility of the raw weights above
        ``FEASIBILITY_EXPLODED``.
    """
    cfg, task, model, built, opt, device = tr.cfg, tr.task, tr.model, tr.built, tr.optimizer, tr.device
    epoch = tr.epoch
    sync = measure.synchronizer(device)
    sync()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    score_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    gen = torch.Generator().manual_seed(data_seed(cfg, epoch))
    for i, (x, y) in enumerate(task.train_batches(cfg.batch_size, gen)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = task.loss(out, y)
        total = loss + built.penalty() if built.penalty is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        loss_sum += loss.detach().double() * x.shape[0]
        score_sum += task.score(out.detach(), y).double()
        seen += x.shape[0]
        tr.step += 1
        if (i + 1) % 50 == 0 and not math.isfinite(loss_sum.item()):
            raise Diverged(epoch)
        if progress is not None:
            progress(i + 1, tr.steps_per_epoch, epoch)
    sync()
    epoch_s = time.perf_counter() - t0
    tr.elapsed += epoch_s
    train_loss = loss_sum.item() / seen
    test_metric = evaluate(model, task, device)
    feas_raw, feas_eff = feasibility(built, cfg.granularity)
    record = {
        "run_id": cfg.run_id,
        "method": cfg.method,
        "task": cfg.task,
        "seed": cfg.seed,
        "penalty_param": cfg.penalty_param,
        "epoch": epoch + 1,
        "step": tr.step,
        "train_loss": train_loss,
        "train_metric": score_sum.item() / seen if task.metric == "acc" else train_loss,
        "metric": task.metric,
        "test_metric": test_metric,
        "test_acc": test_metric if task.metric == "acc" else None,
        "feasibility_raw": feas_raw,
        "feasibility_eff": feas_eff,
        "epoch_s": epoch_s,
        "train_wall_s": tr.elapsed,
    }
    tr.history.append(record)
    tr.epoch = epoch + 1
    exploded = tr.method.constrained and not (feas_raw < FEASIBILITY_EXPLODED)
    if not math.isfinite(train_loss) or exploded or not math.isfinite(test_metric):
        raise Diverged(epoch)
    return record


def final_metrics(tr: Training) -> dict:
    """The trained model's columns of ``runs.csv``: test metric (and after exact
    projection), last training loss and feasibility, how far the recurrent weights moved,
    the optimiser's counters and, for classification, the test confusion matrix."""
    task, device = tr.task, tr.device
    last = tr.history[-1] if tr.history else {}
    test_metric, preds = evaluate(tr.model, task, device, with_predictions=True)
    proj = evaluate(projected_model(tr.model, tr.built), task, device)
    acc = task.metric == "acc"
    row = {
        "test_metric": test_metric,
        "test_metric_projected": proj,
        "test_acc": test_metric if acc else None,
        "test_acc_projected": proj if acc else None,
        "train_loss": last.get("train_loss"),
        "feasibility_raw": last.get("feasibility_raw"),
        "feasibility_eff": last.get("feasibility_eff"),
        "train_s": tr.elapsed,
        "recurrent_change": recurrent_change(tr.start_weights, tr.built),
        **tr.built.counters(tr.optimizer),
    }
    if preds is not None:
        from sklearn.metrics import confusion_matrix

        cm = confusion_matrix(task.test[1].numpy(), preds.numpy(), labels=list(range(task.output_size)))
        row["confusion"] = json.dumps(cm.tolist(), separators=(",", ":"))
    return row


# ---------------------------------------------------------------------------------------
# Checkpoints


class Checkpoint:
    """The checkpoint of one run under ``<checkpoint_dir>/<run_id>.pt``.

    It holds only tensors, numbers and strings (model and optimiser ``state_dict``, the
    epoch, the history rows, the training seconds) and is read with
    ``torch.load(..., weights_only=True)``: a file there that needs anything else (a
    crafted pickle carrying a callable, a foreign file) is refused with one line on
    stderr, never executed, and the run starts afresh.  Written to a temporary file and
    renamed, so a kill never leaves half a checkpoint.
    """

    KEYS = ("model", "optimizer", "epoch", "history", "elapsed")

    def __init__(self, checkpoint_dir, cfg: RunConfig) -> None:
        self.path = Path(checkpoint_dir) / f"{cfg.run_id}.pt"
        self.run_id = cfg.run_id

    def save(self, tr: Training) -> None:
        """Save the state after ``tr.epoch`` epochs (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "model": tr.model.state_dict(),
                "optimizer": tr.optimizer.state_dict(),
                "epoch": tr.epoch,
                "history": tr.history,
                "elapsed": tr.elapsed,
            },
            tmp,
        )
        os.replace(tmp, self.path)

    def load(self, tr: Training) -> bool:
        """Restore ``tr`` from the checkpoint if there is a valid one; True when restored."""
        if not self.path.is_file():
            return False
        try:
            state = torch.load(self.path, map_location=tr.device, weights_only=True)
            if not isinstance(state, dict) or any(k not in state for k in self.KEYS):
                raise ValueError(f"not a checkpoint of bench.runner (keys {', '.join(self.KEYS)})")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(
                f"bench: checkpoint {self.path} refused, not loaded ({reason}); "
                f"run {self.run_id} starts afresh",
                file=sys.stderr,
                flush=True,
            )
            return False
        tr.model.load_state_dict(state["model"])
        tr.optimizer.load_state_dict(state["optimizer"])
        tr.epoch, tr.history, tr.elapsed = (
            int(state["epoch"]),
            list(state["history"]),
            float(state["elapsed"]),
        )
        tr.step = tr.epoch * tr.steps_per_epoch
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# One run


def run_one(
    cfg: RunConfig, data_dir=None, checkpoint_dir=None, progress=None, timing_lock=None
) -> tuple[dict, list[dict]]:
    """Train and evaluate one configuration.

    Returns ``(row, history)``; ``row["status"]`` is ``ok``, ``diverged`` (non-finite loss
    or exploded feasibility; ``diverged_epoch`` says when) or ``failed`` (an exception;
    ``error`` holds one line).  Never raises for a failing run (``KeyboardInterrupt``
    and other ``BaseException``\\ s pass through).  Every key of ``row`` is in
    :data:`RUN_COLUMNS`, every key of a history row in :data:`HISTORY_COLUMNS`.

    ``progress``: optional callable ``progress(done_batches, total_batches, epoch)``.
    ``checkpoint_dir``: when given, the state after each epoch is saved there and an
    interrupted run continues from its last checkpoint (see :class:`Checkpoint`).
    ``timing_lock``: optional context-manager factory held around the throughput
    measurement (:meth:`bench.gate.TimingGate.exclusive`: no neighbour computes meanwhile);
    ``timing_exclusive`` in the row says whether one was held.
    """
    t_start = time.perf_counter()
    row = {**asdict(cfg), "run_id": cfg.run_id, "status": "ok", "error": "", "diverged_epoch": None}
    row["threads"] = torch.get_num_threads()
    tr = None
    try:
        task = get_task(cfg, data_dir)
        row.update(
            metric=task.metric,
            baseline=task.baseline,
            n_train=task.n_train,
            n_test=task.n_test,
            seq_len=task.seq_len,
        )
        measure.reset_peak_memory(cfg.device)
        tr = start_training(cfg, task)
        row["param_count"] = sum(p.numel() for p in tr.model.parameters())
        ckpt = Checkpoint(checkpoint_dir, cfg) if checkpoint_dir else None
        if ckpt is not None and ckpt.load(tr):
            row["resumed_from_epoch"] = tr.epoch
        while tr.epoch < cfg.epochs:
            train_epoch(tr, progress)
            if ckpt is not None:
                ckpt.save(tr)
        row.update(final_metrics(tr))
        row["peak_mem_mb"] = measure.peak_memory_mb(cfg.device)
        with timing_lock() if timing_lock is not None else contextlib.nullcontext():
            row.update(measure_throughput(cfg, task))
        row["timing_exclusive"] = timing_lock is not None
        if ckpt is not None:
            ckpt.remove()
    except Diverged as d:
        row.update(
            status="diverged",
            diverged_epoch=d.epoch + 1,
            error=f"non-finite loss or exploded feasibility in epoch {d.epoch + 1}",
        )
        if tr is not None and tr.history:
            last = tr.history[-1]
            row.update(
                train_loss=last["train_loss"],
                feasibility_raw=last["feasibility_raw"],
                feasibility_eff=last["feasibility_eff"],
            )
    except Exception as exc:  # noqa: BLE001 - a failing run must not stop the sweep
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])
    row["wall_s"] = time.perf_counter() - t_start
    return row, (tr.history if tr is not None else [])
