"""One run: build the model for a method, train it, evaluate it, measure it.

A run is described by a :class:`RunConfig`; its ``run_id`` is a hash of every field,
so the same configuration always has the same id.  :func:`run_one` returns the run's
row for ``runs.csv`` and its rows for ``history.csv``; it never writes them (the sweep
driver does, so any executor can run it).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cdcore import weight_feasibility
from cdcore.dissolving import project

from . import measure
from .methods import METHODS, Built
from .tasks import Task, load_task

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
    seq_len: int | None = None  # synthetic tasks only
    perf_iters: int = 20  # timed steps for the throughput figures

    @property
    def run_id(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def init_seed(cfg: RunConfig) -> int:
    """Seed of the initial weights: independent of the method, so all methods start alike."""
    return derive_seed("init", cfg.seed, cfg.task, cfg.num_layers, cfg.hidden_size, cfg.bidirectional, cfg.seq_len)


def data_seed(cfg: RunConfig, epoch: int) -> int:
    """Seed of the training-batch order in ``epoch`` (independent of the method)."""
    return derive_seed("data", cfg.seed, cfg.task, epoch, cfg.train_subset, cfg.seq_len)


class SeqModel(nn.Module):
    """The notebook's model: a recurrent module, then a Linear head on the last time step
    (or on every step for per-step tasks)."""

    def __init__(self, rnn: nn.Module, head: nn.Linear, per_step: bool = False, context=contextlib.nullcontext):
        super().__init__()
        self.rnn, self.head, self.per_step = rnn, head, per_step
        self._context = context

    def forward(self, x):
        with self._context():
            out, _ = self.rnn(x)
        return self.head(out if self.per_step else out[:, -1])


_TASK_CACHE: dict[tuple, Task] = {}


def get_task(cfg: RunConfig, data_dir) -> Task:
    key = (cfg.task, str(data_dir), cfg.train_subset, cfg.test_subset, cfg.seq_len)
    if key not in _TASK_CACHE:
        _TASK_CACHE.clear()
        _TASK_CACHE[key] = load_task(cfg.task, data_dir=data_dir, train_subset=cfg.train_subset,
                                     test_subset=cfg.test_subset, seq_len=cfg.seq_len)
    return _TASK_CACHE[key]


def build(cfg: RunConfig, task: Task) -> tuple[SeqModel, Built]:
    """The model of ``cfg.method``, from the method-independent initial weights of the seed."""
    torch.manual_seed(init_seed(cfg))
    lstm = nn.LSTM(task.input_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                   bidirectional=cfg.bidirectional)
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


def projected_model(model: SeqModel, built: Built, granularity: str) -> SeqModel:
    """A plain ``nn.LSTM`` model whose recurrent weights are the exact projections
    (polar factors) of the effective ones; everything else copied."""
    rnn = model.rnn
    with torch.no_grad():
        eff = {n: e.detach() for n, (_, e) in built.weights().items()}
        ref = next(model.head.parameters())
        plain = nn.LSTM(rnn.input_size, rnn.hidden_size, rnn.num_layers, batch_first=True,
                        bidirectional=rnn.bidirectional, device=ref.device, dtype=ref.dtype)
        for n in plain._flat_weights_names:
            src = eff[n] if n in eff else getattr(rnn, n)
            if n in eff:
                src = project(src, granularity)
            getattr(plain, n).copy_(src)
    return SeqModel(plain, copy.deepcopy(model.head), model.per_step)


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


@dataclass
class Steps:
    """The timed units of a configuration, on a fixed batch already on the device."""

    train: Callable[[], None]  # forward, loss (+ penalty), backward, optimiser step
    eval: Callable[[], None]  # no-grad forward in eval mode
    constraint: Callable[[], None] | None  # the constraint's own work (see bench.methods)
    batch_size: int
    model: nn.Module


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

    return Steps(train_step, eval_step, built.constraint_work, int(x.shape[0]), model)


def measure_throughput(cfg: RunConfig, task: Task, warmup: int = 3) -> dict:
    """Train and eval samples/s of a fresh model of ``cfg`` and the constraint's share.

    Warm-up steps are discarded; CUDA is synchronised before each clock read
    (:func:`bench.measure.time_fn`).  ``constraint_share`` is the time of the
    constraint's own work (map and penalty with their backward, the retraction, or the
    trivialisation) divided by the time of the whole train step.
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


class Diverged(Exception):
    pass


def _checkpoint_path(ckpt_dir, cfg: RunConfig) -> Path:
    return Path(ckpt_dir) / f"{cfg.run_id}.pt"


def _save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def run_one(cfg: RunConfig, data_dir=None, checkpoint_dir=None, progress=None) -> tuple[dict, list[dict]]:
    """Train and evaluate one configuration.

    Returns ``(row, history)``; ``row["status"]`` is ``ok``, ``diverged`` (non-finite loss
    or exploded feasibility; ``diverged_epoch`` says when) or ``failed`` (an exception;
    ``error`` holds one line).  Never raises for a failing run.

    ``progress``: optional callable ``progress(done_batches, total_batches, epoch)``.
    ``checkpoint_dir``: when given, the state after each epoch is saved there and an
    interrupted run continues from its last checkpoint.
    """
    t_start = time.perf_counter()
    method = METHODS[cfg.method]
    row = {**asdict(cfg), "run_id": cfg.run_id, "status": "ok", "error": "", "diverged_epoch": None}
    history: list[dict] = []
    device = torch.device(cfg.device)
    try:
        task = get_task(cfg, data_dir)
        row.update(metric=task.metric, baseline=task.baseline, n_train=task.n_train, n_test=task.n_test,
                   seq_len=task.seq_len)
        measure.reset_peak_memory(device)
        model, built = build(cfg, task)
        opt = built.optimizer(model)
        row["param_count"] = sum(p.numel() for p in model.parameters())
        start_epoch, elapsed = 0, 0.0
        ckpt = _checkpoint_path(checkpoint_dir, cfg) if checkpoint_dir else None
        if ckpt is not None and ckpt.is_file():
            state = torch.load(ckpt, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
            row["resumed_from_epoch"] = start_epoch
        sync = measure.synchronizer(device)
        steps_per_epoch = math.ceil(task.n_train / cfg.batch_size) if task.train is not None else task.batches_per_epoch
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
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
                step += 1
                if (i + 1) % 50 == 0 and not math.isfinite(loss_sum.item()):
                    raise Diverged(epoch)
                if progress is not None:
                    progress(i + 1, steps_per_epoch, epoch)
            sync()
            epoch_s = time.perf_counter() - t0
            elapsed += epoch_s
            train_loss = loss_sum.item() / seen
            test_metric = evaluate(model, task, device)
            feas_raw, feas_eff = feasibility(built, cfg.granularity)
            history.append({
                "run_id": cfg.run_id, "method": cfg.method, "task": cfg.task, "seed": cfg.seed,
                "penalty_param": cfg.penalty_param, "epoch": epoch + 1, "step": step,
                "train_loss": train_loss, "train_metric": score_sum.item() / seen if task.metric == "acc" else train_loss,
                "metric": task.metric, "test_metric": test_metric,
                "test_acc": test_metric if task.metric == "acc" else None,
                "feasibility_raw": feas_raw, "feasibility_eff": feas_eff,
                "epoch_s": epoch_s, "train_wall_s": elapsed,
            })
            exploded = method.name != "lstm" and not (feas_raw < FEASIBILITY_EXPLODED)
            if not math.isfinite(train_loss) or exploded or not math.isfinite(test_metric):
                raise Diverged(epoch)
            if ckpt is not None:
                _save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "epoch": epoch + 1, "history": history, "elapsed": elapsed})
        last = history[-1] if history else {}
        test_metric, preds = evaluate(model, task, device, with_predictions=True)
        proj = evaluate(projected_model(model, built, cfg.granularity), task, device)
        row.update(
            test_metric=test_metric, test_metric_projected=proj,
            test_acc=test_metric if task.metric == "acc" else None,
            test_acc_projected=proj if task.metric == "acc" else None,
            train_loss=last.get("train_loss"), feasibility_raw=last.get("feasibility_raw"),
            feasibility_eff=last.get("feasibility_eff"), train_s=elapsed,
            reprojections=opt.reprojections() if hasattr(opt, "reprojections") else None,
        )
        if preds is not None:
            from sklearn.metrics import confusion_matrix

            cm = confusion_matrix(task.test[1].numpy(), preds.numpy(), labels=list(range(task.output_size)))
            row["confusion"] = json.dumps(cm.tolist(), separators=(",", ":"))
        row["peak_mem_mb"] = measure.peak_memory_mb(device)
        row.update(measure_throughput(cfg, task))
        if ckpt is not None and ckpt.is_file():
            ckpt.unlink()
    except Diverged as d:
        row.update(status="diverged", diverged_epoch=int(d.args[0]) + 1,
                   error=f"non-finite loss or exploded feasibility in epoch {int(d.args[0]) + 1}")
        if history:
            row.update(train_loss=history[-1]["train_loss"], feasibility_raw=history[-1]["feasibility_raw"],
                       feasibility_eff=history[-1]["feasibility_eff"])
    except Exception as exc:  # noqa: BLE001 - a failing run must not stop the sweep
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        row.update(status="failed", error=msg[:500])
        row["traceback"] = traceback.format_exc()
    row["wall_s"] = time.perf_counter() - t_start
    return row, history


CONFIG_FIELDS = [f.name for f in fields(RunConfig)]
__all__ = ["CONFIG_FIELDS", "RunConfig", "SeqModel", "Steps", "build", "derive_seed", "evaluate", "make_steps",
           "measure_throughput", "run_one"]

