"""One run: build the model for a method, train it, evaluate it, measure it.

A run is described by a :class:`RunConfig`; its ``run_id`` is a hash of every field (see
:attr:`RunConfig.run_id` for the fields added since 0.1.0), so the same configuration always
has the same id.  :func:`run_one` returns the run's row for ``runs.csv`` and its rows for
``history.csv``; it never writes them (the sweep driver does, so any executor can run it).
Every key of those rows is a column: :data:`RUN_COLUMNS` (the RunConfig fields,
:data:`MEASURED_COLUMNS` and :data:`PROVENANCE_COLUMNS`) and :data:`HISTORY_COLUMNS`.

The trainer knows no method: it asks the method's :class:`bench.methods.Built` for the
optimiser, the penalty, the recurrent weights, the projected plain module and the
optimiser's counters, and ``Method.constrained`` for whether feasibility can explode.

What a run records (docs: README "Reading results/"):

* every ``log_every`` optimiser steps a ``history.csv`` row of kind ``step``: training loss
  and penalty averaged over the steps since the previous logged step of the epoch,
  feasibility of the raw and effective recurrent weights, the learning rate, and every
  ``eval_every`` steps (and at the last step) the validation metric;
* at the end of every epoch a row of kind ``epoch`` with the test metric;
* in ``runs.csv`` the test metric at the final step and with the weights of the best
  validation evaluation (``test_metric_at_best_val``: model selection never looks at the
  test set), the first logged step and training second at which the validation metric
  reached the task's target, the whole run's training throughput, and a paired
  steady-state micro-measurement (:func:`measure_throughput`).

Training time (``train_wall_s``, ``train_s``) excludes logging and evaluation: each logged
step synchronises the device, reads the clock, logs, synchronises again and subtracts what
it took.  Between logged steps nothing waits for the device (losses are summed on it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from cdcore import weight_feasibility

from . import cells, measure
from .errors import Diverged
from .methods import LEGACY_NAMES, METHODS, Built, Method, canonical
from .perf.paired import interleaved_times, ratio_stats
from .tasks import TASKS, Task, load_task

__all__ = [
    "AMP_MODES",
    "EVALUATIONS",
    "HISTORY_COLUMNS",
    "MIN_LOGGED_POINTS",
    "SCHEDULES",
    "MEASURED_COLUMNS",
    "PROVENANCE_COLUMNS",
    "RUN_COLUMNS",
    "Checkpoint",
    "RunConfig",
    "SeqModel",
    "Steps",
    "Training",
    "amp_context",
    "baseline_method",
    "build",
    "derive_seed",
    "evaluate",
    "final_metrics",
    "make_optimizer",
    "make_scheduler",
    "make_steps",
    "make_train_step",
    "measure_throughput",
    "normalized",
    "resolved_fields",
    "run_one",
    "start_training",
    "train_epoch",
    "upgrade_row",
]

#: feasibility ||W^T W - I||_F above which a constrained run counts as diverged
FEASIBILITY_EXPLODED = 1e3
#: learning-rate schedules (``RunConfig.schedule``), stepped once per optimiser step
SCHEDULES = ("constant", "cosine", "onecycle")
#: mixed-precision modes (``RunConfig.amp``); fp16 needs CUDA
AMP_MODES = ("off", "bf16", "fp16")
#: logged steps per run at least, when ``log_every`` is automatic
MIN_LOGGED_POINTS = 50
#: validation evaluations per run aimed at when ``eval_every`` is automatic (and >= 1 per epoch)
EVALUATIONS = 10


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run (all of it enters ``run_id``).

    ``method`` is stored under its canonical name: an alias (``lstm``, the unconstrained
    method's name in 0.1.0) is replaced by it (``unconstrained``) on construction.
    ``cell``: ``lstm``, ``gru`` or ``rnn`` (:mod:`bench.cells`); ``nonlinearity`` (``tanh``,
    ``relu``) is used by the ``rnn`` cell only; ``init``: the initialisation of the recurrent
    weights (:data:`bench.cells.INITS`); ``optimizer``: ``adam`` or ``rmsprop`` for the whole
    model (:func:`bench.methods.make_optimizer`).
    """

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
    perf_iters: int = 20  # timed rounds of the steady-state throughput figures
    # ---- fields added after 0.1.0 (listed in ADDED_FIELDS) ----
    val_size: int = 0  # held-out validation examples; 0: none (bench.ablate fills the task's default)
    log_every: int | None = None  # None: automatic, >= MIN_LOGGED_POINTS logged steps per run
    eval_every: int | None = None  # None: automatic, about EVALUATIONS per run, >= 1 per epoch
    target: float | None = None  # None: the task's target for the profile
    schedule: str = "constant"  # constant | cosine | onecycle
    clip: float | None = None  # max gradient norm (all parameters), None: no clipping
    weight_decay: float = 0.0  # L2, on parameters other than the recurrent weights
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    cell: str = cells.DEFAULT_CELL
    init: str = cells.DEFAULT_INIT
    optimizer: str = "adam"
    nonlinearity: str = "tanh"  # the rnn cell's; other cells ignore it
    threads: int = 1  # torch threads of the run (--threads-per-run), set by run_one on every executor

    #: Fields added after 0.1.0.  Each enters ``run_id`` only when it differs from its
    #: default, so the run_ids of results folders written before it existed stay valid: at
    #: its default every such field but ``threads`` trains exactly as 0.1.0 did (``val_size``
    #: 0 is 0.1.0's "no validation split"; logging, evaluation and the target change what is
    #: measured, never the training).  A new field goes here, with a default that keeps that
    #: promise.
    ADDED_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "val_size",
            "log_every",
            "eval_every",
            "target",
            "schedule",
            "clip",
            "weight_decay",
            "amp",
            "cell",
            "init",
            "optimizer",
            "nonlinearity",
            "threads",
        }
    )
    #: Added fields whose value a row written before them cannot know: ``threads`` is the one
    #: whose default is not what 0.1.0 did (it ran with torch's default, every core), so
    #: :func:`upgrade_row` keeps what a row recorded, or leaves it unknown; run_ids unchanged.
    UNKNOWN_BEFORE: ClassVar[frozenset[str]] = frozenset({"threads"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", canonical(self.method))

    @property
    def run_id(self) -> str:
        """12 hex digits of the SHA-1 of the fields as sorted JSON.

        Stable across versions: a field of :attr:`ADDED_FIELDS` at its default is left out,
        and the method is hashed under its 0.1.0 name (``unconstrained`` as ``lstm``), so a
        configuration that 0.1.0 could express keeps the run_id 0.1.0 gave it.
        """
        defaults = {f.name: f.default for f in fields(self)}
        config = {k: v for k, v in asdict(self).items() if k not in self.ADDED_FIELDS or v != defaults[k]}
        config["method"] = LEGACY_NAMES.get(config["method"], config["method"])
        blob = json.dumps(config, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


#: the measured columns that are times, rates or memory (how fast the run went, not what it computed)
TIMED_COLUMNS = [
    "train_samples_per_s",
    "step_samples_per_s",
    "step_vs_baseline",
    "eval_samples_per_s",
    "train_step_ms",
    "constraint_share",
    "peak_mem_mb",
]
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
    "val_metric",
    "best_val_metric",
    "best_val_step",
    "test_metric_at_best_val",
    "target_value",
    "steps_to_target",
    "seconds_to_target",
    "train_loss",
    "feasibility_raw",
    "feasibility_eff",
    "recurrent_change",
    "reprojections",
    "weight_path",
    *TIMED_COLUMNS,
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
#: every column of history.csv: rows of kind "step" (every log_every optimiser steps) and
#: "epoch" (end of each epoch, with the test metric)
HISTORY_COLUMNS = [
    "run_id",
    "method",
    "cell",
    "task",
    "seed",
    "penalty_param",
    "kind",
    "epoch",
    "step",
    "train_wall_s",
    "samples",
    "train_loss",
    "penalty",
    "train_metric",
    "metric",
    "feasibility_raw",
    "feasibility_eff",
    "val_metric",
    "test_metric",
    "test_acc",
    "lr",
    "epoch_s",
]


def upgrade_row(row: dict) -> dict:
    """A ``runs.csv`` or ``history.csv`` row written by an older version, in today's terms.

    The method under its canonical name (``lstm`` -> ``unconstrained``) and every field of
    :attr:`RunConfig.ADDED_FIELDS` that the row lacks or leaves empty at its default (what the
    run used: the field did not exist).  The run_id is unchanged (:attr:`RunConfig.run_id` hashes
    exactly what 0.1.0 hashed for such a run), so resuming an old folder matches its rows.

    ``threads`` (:attr:`RunConfig.UNKNOWN_BEFORE`) is not filled: before it was part of the
    configuration it was the provenance column of the run's torch threads, so a row that
    recorded one (e.g. 2 from the local executor) keeps it as its configuration, which is how it
    trained, and a row without one (0.1.0: torch's default, every core) keeps it empty, unknown.
    Either way the row forms its own configuration in the statistics, apart from the 1-thread
    runs, and ``bench.ablate`` says so when such a row stands for a planned run (it keeps it,
    ``--force`` retrains it).  Returns a new dict; ``row`` is not modified.
    """
    out = dict(row)
    if out.get("method"):
        out["method"] = canonical(out["method"])
    for f in fields(RunConfig):
        if f.name in RunConfig.UNKNOWN_BEFORE:
            continue
        if f.name in RunConfig.ADDED_FIELDS and out.get(f.name) in (None, ""):
            out[f.name] = f.default
    return out


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

    def forward_with_penalty(self, x) -> tuple[Tensor, Tensor]:
        """``(output, penalty)`` from the recurrent module's ``forward_with_penalty`` (see
        ``bench.methods.Built.penalty_in_forward``): one forward that also returns the penalty."""
        with self._context():
            out, _, penalty = self.rnn.forward_with_penalty(x)
        return self.head(out if self.per_step else out[:, -1]), penalty


_TASK_CACHE: dict[tuple, Task] = {}


def task_options(cfg: RunConfig) -> dict:
    """The loader options of ``cfg.task`` taken from ``cfg`` (subsets, validation size, and
    the task's own)."""
    spec = TASKS[cfg.task]
    return {
        "train_subset": cfg.train_subset,
        "test_subset": cfg.test_subset,
        "val_size": cfg.val_size,
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
    """The model of ``cfg.method``, from the method-independent initial weights of the seed.

    The plain module of ``cfg.cell`` and the head are drawn from ``init_seed(cfg)``; then
    ``cfg.init`` replaces the recurrent weights (:func:`bench.cells.initialize`, from its own
    generator: the head does not depend on it), and only then the method attaches.
    """
    torch.manual_seed(init_seed(cfg))
    plain = cells.make_plain(
        cfg.cell, task.input_size, cfg.hidden_size, cfg.num_layers, cfg.bidirectional, cfg.nonlinearity
    )
    head = nn.Linear(cfg.hidden_size * (2 if cfg.bidirectional else 1), task.output_size)
    cells.initialize(plain, cfg.init, torch.Generator().manual_seed(derive_seed("recurrent", init_seed(cfg))))
    device = torch.device(cfg.device)
    plain, head = plain.to(device), head.to(device)
    built = METHODS[cfg.method].build(plain, cfg)
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


def evaluate(
    model: SeqModel,
    task: Task,
    device,
    batch_size: int = 1000,
    with_predictions=False,
    split: str = "test",
    amp=contextlib.nullcontext,
):
    """Metric over the whole test set (``split="val"``: the validation set): accuracy in
    [0, 1], or mean loss.  ``amp``: the run's autocast context (:func:`amp_context`)."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    with torch.no_grad():
        for x, y in task.test_batches(batch_size, split):
            x, y = x.to(device), y.to(device)
            with amp():
                out = model(x)
            total += task.score(out.float(), y).double()
            if with_predictions and task.metric == "acc":
                preds.append(out.argmax(-1).cpu())
    model.train()
    value = total.item() / (task.n_test if split == "test" else task.n_val)
    return (value, torch.cat(preds) if preds else None) if with_predictions else value


# ---------------------------------------------------------------------------------------
# The training recipe: optimiser (+ weight decay), schedule, clipping, mixed precision


def amp_context(cfg: RunConfig) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable returning the autocast context of ``cfg.amp`` (entered
    around every forward and loss, in training and evaluation; the penalty and the
    optimiser step run outside it).

    Raises
    ------
    ValueError
        Unknown ``cfg.amp``, or ``fp16`` on a device other than CUDA (float16 training
        needs ``torch.amp.GradScaler``, which this harness uses on CUDA only).
    """
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"unknown amp {cfg.amp!r}; allowed: {', '.join(AMP_MODES)}")
    if cfg.amp == "off":
        return contextlib.nullcontext
    device_type = torch.device(cfg.device).type
    if cfg.amp == "fp16" and device_type != "cuda":
        raise ValueError(f"amp fp16 needs a CUDA device; got device {cfg.device!r} (use bf16 or off)")
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type, dtype=dtype)


def make_scaler(cfg: RunConfig):
    """``torch.amp.GradScaler("cuda")`` for ``amp="fp16"``, else None."""
    return torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None


def is_recurrent(name: str) -> bool:
    """True for a parameter name of a recurrent (hidden-to-hidden) weight: ``weight_hh`` in
    it, as in ``rnn.weight_hh_l0`` or a trivialisation's ``rnn.parametrizations.weight_hh_l0.original``."""
    return "weight_hh" in name


def make_optimizer(cfg: RunConfig, model: nn.Module, built: Built) -> torch.optim.Optimizer:
    """The method's optimiser, with ``cfg.weight_decay`` on every parameter that is not a
    recurrent weight (:func:`is_recurrent`): input weights, biases and the head.

    Weight decay is the optimiser's own L2 term (``weight_decay`` of ``torch.optim.Adam`` and
    of the Euclidean groups of ``cdcore.optim.CayleyAdam``).  It never touches a recurrent
    weight, of any method: the constrained ones (a decayed point leaves the manifold, and
    decaying a trivialisation's parameter would pull toward one fixed orthogonal matrix)
    nor, so that every method trains the same recipe, the unconstrained method's.  With
    decay, each parameter group holding both kinds is split in two before any step; without
    it the optimiser is the method's, untouched.
    """
    opt = built.optimizer(model)
    if not cfg.weight_decay:
        return opt
    decayed = {id(p) for n, p in model.named_parameters() if not is_recurrent(n)}
    for group in list(opt.param_groups):
        decay = [p for p in group["params"] if id(p) in decayed]
        keep = [p for p in group["params"] if id(p) not in decayed]
        if not decay:
            continue
        if not keep:
            group["weight_decay"] = cfg.weight_decay
            continue
        group["params"] = keep
        options = {k: v for k, v in group.items() if k != "params"}
        opt.add_param_group({**options, "params": decay, "weight_decay": cfg.weight_decay})
    return opt


def make_scheduler(cfg: RunConfig, opt: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule of ``cfg.schedule``, stepped after every optimiser step, on
    every parameter group (the constrained one included); None for ``constant``.

    * ``cosine``: ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps)``, from each
      group's lr down to 0 at the last step (Loshchilov & Hutter, SGDR, ICLR 2017, eq. 5
      without restarts).
    * ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` with ``max_lr`` = each group's lr
      and torch's defaults otherwise (warm-up over 30 % of the steps from max_lr / 25, cosine
      annealing to max_lr / 2.5e5, Adam's beta1 cycled between 0.95 and 0.85; with RMSprop
      nothing but the lr is cycled: its momentum stays 0) (Smith & Topin 2017, arXiv:1708.07120).

    Raises
    ------
    ValueError
        Unknown ``cfg.schedule``.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "onecycle":
        # Only Adam's beta1 is cycled: torch's OneCycleLR would otherwise cycle RMSprop's
        # ``momentum`` (0 by default) to 0.85-0.95, silently turning on heavy-ball momentum,
        # and it refuses CayleyRMSprop, which has none.
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total_steps,
            cycle_momentum=all("betas" in g for g in opt.param_groups),
        )
    return None


def make_train_step(
    cfg: RunConfig,
    task: Task,
    model: SeqModel,
    built: Built,
    opt: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]:
    """One optimiser step on a batch, the same in training and in the throughput figures.

    ``step(x, y) -> (output, loss, penalty)`` (detached; penalty None without one): forward
    and task loss under the run's autocast (:func:`amp_context`), the method's penalty added
    outside it (or, with ``Built.penalty_in_forward``, taken from the forward, whose constraint
    arithmetic runs in float32 with autocast off all the same), backward (scaled by ``scaler``
    for fp16), then, with ``cfg.clip``, the gradient norm of all parameters clipped to ``cfg.clip``
    (``torch.nn.utils.clip_grad_norm_``, after unscaling) before the optimiser step -- for
    ``cayley`` that is the Euclidean gradient, clipped before CayleyAdam projects it onto
    the tangent space and retracts -- and the schedule stepped.
    """
    amp = amp_context(cfg)
    params = [p for p in model.parameters()]

    def step(x, y):
        with amp():
            if built.penalty_in_forward:
                out, pen = model.forward_with_penalty(x)
            else:
                out, pen = model(x), None
            loss = task.loss(out, y)
        if pen is None and built.penalty is not None:
            pen = built.penalty()
        total = loss + pen if pen is not None else loss
        opt.zero_grad(set_to_none=True)
        (scaler.scale(total) if scaler is not None else total).backward()
        if cfg.clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        return out.detach(), loss.detach(), None if pen is None else pen.detach()

    return step


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
    columns and ``nox -s perf`` time (data loading excluded: the batch is moved first).

    The train step is the training loop's own (:func:`make_train_step`: autocast, penalty,
    gradient scaling, clipping and weight decay as configured) without the schedule, whose
    cost is a few scalar operations per step.
    """
    amp = amp_context(cfg)
    model, built = build(cfg, task)
    opt = make_optimizer(cfg, model, built)
    step = make_train_step(cfg, task, model, built, opt, scaler=make_scaler(cfg))
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(derive_seed("perf", cfg.seed))
    x, y = next(task.train_batches(cfg.batch_size, gen))
    x, y = x.to(device), y.to(device)

    def train_step():
        model.train()
        step(x, y)

    def eval_step():
        model.eval()
        with torch.no_grad(), amp():
            model(x)

    return Steps(train_step, eval_step, built.constraint_work, int(x.shape[0]))


def baseline_method() -> str:
    """The name of the registry's unconstrained method (the first with ``constrained=False``),
    against which ``step_vs_baseline`` is measured."""
    return next(m.name for m in METHODS.values() if not m.constrained)


def measure_throughput(cfg: RunConfig, task: Task, warmup: int = 3, clock=time.perf_counter) -> dict:
    """Steady-state train-step throughput of a fresh model of ``cfg``, paired with the
    unconstrained method's step of the same shape; eval throughput; the constraint's share.

    This is the harness's single micro-measurement (the whole-run figure
    ``train_samples_per_s`` comes from the training itself).  ``cfg.perf_iters`` rounds of
    :func:`bench.perf.paired.interleaved_times` after ``warmup`` untimed calls of each
    function: every round times, in a fresh random order and each between two device
    synchronisations, one train step of ``cfg``, one train step of
    :func:`baseline_method` with the same configuration (not for the baseline method
    itself), and the constraint's own work (map and penalty with their backward, the
    retraction, or the trivialisation; methods that have one).  Eval: ``cfg.perf_iters``
    no-grad forwards after ``warmup`` (:func:`bench.measure.time_fn`).

    Returns
    -------
    dict
        ``step_samples_per_s`` (batch / median step seconds), ``train_step_ms`` (that
        median, ms), ``step_vs_baseline`` (median over rounds of t_baseline / t_method:
        > 1 is faster than the baseline; 1.0 for the baseline method itself),
        ``constraint_share`` (median over rounds of t_constraint / t_method; 0 without
        constraint work) and ``eval_samples_per_s``.
    """
    steps = make_steps(cfg, task)
    sync = measure.synchronizer(cfg.device)
    fns = {"method": steps.train}
    base = baseline_method()
    if cfg.method != base:
        base_cfg = dataclasses.replace(cfg, method=base, penalty_param=None)
        fns["baseline"] = make_steps(base_cfg, task).train
    if steps.constraint is not None:
        fns["constraint"] = steps.constraint
    times = interleaved_times(
        fns,
        rounds=cfg.perf_iters,
        warmup=warmup,
        sync=sync,
        seed=derive_seed("rounds", cfg.seed),
        clock=clock,
    )
    t_train = statistics.median(times["method"])
    t_eval = measure.time_fn(steps.eval, warmup=warmup, iters=cfg.perf_iters, sync=sync, clock=clock)
    share = 0.0
    if "constraint" in times:
        share = statistics.median(c / t for c, t in zip(times["constraint"], times["method"]))
    return {
        "step_samples_per_s": steps.batch_size / t_train,
        "step_vs_baseline": ratio_stats(times["baseline"], times["method"])["ratio"]
        if "baseline" in times
        else 1.0,
        "eval_samples_per_s": steps.batch_size / t_eval.seconds_per_iter,
        "train_step_ms": 1e3 * t_train,
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
    scheduler: object = None  # torch.optim.lr_scheduler.LRScheduler or None
    scaler: object = None  # torch.amp.GradScaler or None
    step_fn: Callable = None  # make_train_step(...)
    amp: Callable = contextlib.nullcontext
    log_every: int = 1
    eval_every: int = 1
    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    samples: int = 0  # training samples seen
    elapsed: float = 0.0  # seconds of training so far (logging and evaluation excluded)
    history: list[dict] = field(default_factory=list)
    last_val: float | None = None  # validation metric at the latest evaluation
    last_val_step: int | None = None
    best_val: float | None = None  # best validation metric so far, its step and weights
    best_step: int | None = None
    best_state: dict | None = None

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.cfg, self.task)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def higher_is_better(self) -> bool:
        return self.task.metric == "acc"

    def logs_at(self, step: int) -> bool:
        """Whether optimiser step ``step`` (1-based) is logged: every ``log_every`` and
        ``eval_every`` steps, and the last one."""
        return step % self.log_every == 0 or self.evaluates_at(step) or step == self.total_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the validation metric is computed after step ``step``: every ``eval_every``
        steps and at the last one, when the task has a validation set."""
        return self.task.val is not None and (step % self.eval_every == 0 or step == self.total_steps)


def steps_per_epoch(cfg: RunConfig, task: Task) -> int:
    """Optimiser steps per epoch of ``cfg`` on ``task`` (generated tasks: their batches per epoch)."""
    return math.ceil(task.n_train / cfg.batch_size) if task.train is not None else task.batches_per_epoch


def resolved_fields(cfg: RunConfig, task: Task) -> dict:
    """The configuration columns of a run's row that are resolved from its task.

    ``seq_len`` and ``val_size`` (the task's), ``log_every`` and ``eval_every`` (automatic ones
    computed by :func:`logging_intervals`).  :func:`run_one` writes them into every row it
    returns, whatever the status, and ``bench.ablate`` into the row of a run whose worker died,
    so a failed run stays in its configuration (statistics group rows by these columns).

    Returns
    -------
    dict
        ``{"seq_len": int, "val_size": int, "log_every": int, "eval_every": int}``.
    """
    log_every, eval_every = logging_intervals(cfg, steps_per_epoch(cfg, task))
    return {"seq_len": task.seq_len, "val_size": task.n_val, "log_every": log_every, "eval_every": eval_every}


def normalized(cfg: RunConfig, task: Task) -> RunConfig:
    """``cfg`` with every given value that changes nothing made automatic (None) again.

    ``log_every`` / ``eval_every`` equal to their automatic value (:func:`logging_intervals`) and
    ``target`` equal to the task's for the profile (:func:`target_value`); without a validation
    set, ``eval_every`` and ``target`` whatever their value (nothing is evaluated).  The run then
    trains and records exactly what the automatic one does, and has its run_id: giving the
    values a first run resolved (its row's columns) plans that run again, and resume skips it.
    ``bench.ablate`` normalises every planned run.
    """
    auto = dataclasses.replace(cfg, log_every=None, eval_every=None, target=None)
    log_auto, eval_auto = logging_intervals(auto, steps_per_epoch(cfg, task))
    no_val = task.val is None
    changes = {}
    if cfg.log_every is not None and cfg.log_every == log_auto:
        changes["log_every"] = None
    if cfg.eval_every is not None and (no_val or cfg.eval_every == eval_auto):
        changes["eval_every"] = None
    if cfg.target is not None and (no_val or float(cfg.target) == target_value(auto, task)):
        changes["target"] = None
    return dataclasses.replace(cfg, **changes) if changes else cfg


def logging_intervals(cfg: RunConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(log_every, eval_every)`` of ``cfg``; automatic values where they are None.

    Automatic ``log_every``: ``max(1, total_steps // MIN_LOGGED_POINTS)``, so that every run
    logs at least ``MIN_LOGGED_POINTS`` steps (every step when it has fewer).  Automatic
    ``eval_every``: ``max(1, min(steps_per_epoch, total_steps // EVALUATIONS))``: about
    ``EVALUATIONS`` validation evaluations per run, at least one per epoch.
    """
    total = cfg.epochs * steps_per_epoch
    log_every = cfg.log_every or max(1, total // MIN_LOGGED_POINTS)
    eval_every = cfg.eval_every or max(1, min(steps_per_epoch, total // EVALUATIONS))
    return int(log_every), int(eval_every)


def target_value(cfg: RunConfig, task: Task) -> float | None:
    """The validation target of the run: ``cfg.target``, else the task's target for
    ``cfg.profile`` (:meth:`bench.tasks.TaskSpec.target`); None without a validation set."""
    if task.val is None:
        return None
    if cfg.target is not None:
        return float(cfg.target)
    spec = TASKS.get(cfg.task)
    return spec.target(cfg.profile, task) if spec is not None else None


def start_training(cfg: RunConfig, task: Task) -> Training:
    """A fresh model of ``cfg`` with its optimiser, schedule and scaler, before any step."""
    amp = amp_context(cfg)  # first: refuses fp16 off CUDA before anything is built
    model, built = build(cfg, task)
    opt = make_optimizer(cfg, model, built)
    tr = Training(
        cfg,
        task,
        METHODS[cfg.method],
        model,
        built,
        opt,
        torch.device(cfg.device),
        effective_weights(built),
        scaler=make_scaler(cfg),
        amp=amp,
    )
    tr.log_every, tr.eval_every = logging_intervals(cfg, tr.steps_per_epoch)
    tr.scheduler = make_scheduler(cfg, opt, tr.total_steps)
    tr.step_fn = make_train_step(cfg, task, model, built, opt, tr.scheduler, tr.scaler)
    return tr


def _validate(tr: Training) -> float:
    """Validation metric now; keeps a copy of the weights when it is the best so far."""
    v = evaluate(tr.model, tr.task, tr.device, split="val", amp=tr.amp)
    tr.last_val, tr.last_val_step = v, tr.step
    if math.isfinite(v) and (
        tr.best_val is None or (v > tr.best_val if tr.higher_is_better else v < tr.best_val)
    ):
        tr.best_val, tr.best_step = v, tr.step
        tr.best_state = {k: t.detach().clone() for k, t in tr.model.state_dict().items()}
    return v


def _row(tr: Training, kind: str, epoch: int, **values) -> dict:
    """A history row with every column of HISTORY_COLUMNS (None where not measured)."""
    cfg = tr.cfg
    row = dict.fromkeys(HISTORY_COLUMNS)
    row.update(
        run_id=cfg.run_id,
        method=cfg.method,
        cell=cfg.cell,
        task=cfg.task,
        seed=cfg.seed,
        penalty_param=cfg.penalty_param,
        kind=kind,
        epoch=epoch + 1,
        step=tr.step,
        samples=tr.samples,
        metric=tr.task.metric,
        lr=tr.optimizer.param_groups[0]["lr"],
        **values,
    )
    return row


def _check(tr: Training, epoch: int, loss: float, feas_raw: float, metric: float | None = None) -> None:
    exploded = tr.method.constrained and not (feas_raw < FEASIBILITY_EXPLODED)
    if not math.isfinite(loss) or exploded or (metric is not None and not math.isfinite(metric)):
        raise Diverged(epoch)


def train_epoch(tr: Training, progress=None) -> dict:
    """One epoch of training with its logged steps, then the test metric and feasibility:
    appends the epoch's ``history.csv`` rows to ``tr.history`` and returns the epoch row.

    A logged step (:meth:`Training.logs_at`) synchronises the device, reads the clock,
    records a row of kind ``step`` (the training loss and penalty averaged over the steps
    since the previous logged step of this epoch, feasibility, learning rate, and the
    validation metric when :meth:`Training.evaluates_at`), synchronises again and leaves
    the time it took out of the training time.

    Raises
    ------
    bench.errors.Diverged
        Non-finite loss (checked at each logged step and at the end of the epoch),
        non-finite validation or test metric, or, for a constrained method, feasibility of
        the raw weights above ``FEASIBILITY_EXPLODED`` (at each logged step and epoch end).
    """
    cfg, task, built, device = tr.cfg, tr.task, tr.built, tr.device
    epoch = tr.epoch
    sync = measure.synchronizer(device)

    def zero():
        return torch.zeros((), device=device, dtype=torch.float64)

    # sums over the epoch and over the steps since the last logged one: on the device, no sync
    ep_loss, ep_pen, ep_score, ep_n = zero(), zero(), zero(), 0
    iv_loss, iv_pen, iv_score, iv_n = zero(), zero(), zero(), 0
    has_penalty = built.penalty is not None
    acc = task.metric == "acc"
    gen = torch.Generator().manual_seed(data_seed(cfg, epoch))
    sync()
    t0 = time.perf_counter()
    paused = 0.0  # seconds spent logging and evaluating in this epoch
    for i, (x, y) in enumerate(task.train_batches(cfg.batch_size, gen)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out, loss, pen = tr.step_fn(x, y)
        n = x.shape[0]
        wl = loss.double() * n
        sc = task.score(out.float(), y).double()
        ep_loss += wl
        iv_loss += wl
        ep_score += sc
        iv_score += sc
        if has_penalty:
            wp = pen.double() * n
            ep_pen += wp
            iv_pen += wp
        ep_n += n
        iv_n += n
        tr.step += 1
        tr.samples += n
        if tr.logs_at(tr.step):
            sync()
            t1 = time.perf_counter()
            train_loss = iv_loss.item() / iv_n
            feas_raw, feas_eff = feasibility(built, cfg.granularity)
            val = _validate(tr) if tr.evaluates_at(tr.step) else None
            tr.history.append(
                _row(
                    tr,
                    "step",
                    epoch,
                    train_wall_s=tr.elapsed + (t1 - t0 - paused),
                    train_loss=train_loss,
                    penalty=iv_pen.item() / iv_n if has_penalty else None,
                    train_metric=iv_score.item() / iv_n if acc else train_loss,
                    feasibility_raw=feas_raw,
                    feasibility_eff=feas_eff,
                    val_metric=val,
                )
            )
            iv_loss, iv_pen, iv_score, iv_n = zero(), zero(), zero(), 0
            _check(tr, epoch, train_loss, feas_raw, val)
            sync()
            paused += time.perf_counter() - t1
        if progress is not None:
            # a packed run may wait here while a neighbour times its steps: not training time
            paused += progress(i + 1, tr.steps_per_epoch, epoch) or 0.0
    sync()
    epoch_s = time.perf_counter() - t0 - paused
    tr.elapsed += epoch_s
    train_loss = ep_loss.item() / ep_n
    test_metric = evaluate(tr.model, task, device, amp=tr.amp)
    feas_raw, feas_eff = feasibility(built, cfg.granularity)
    record = _row(
        tr,
        "epoch",
        epoch,
        train_wall_s=tr.elapsed,
        train_loss=train_loss,
        penalty=ep_pen.item() / ep_n if has_penalty else None,
        train_metric=ep_score.item() / ep_n if acc else train_loss,
        feasibility_raw=feas_raw,
        feasibility_eff=feas_eff,
        val_metric=tr.last_val if tr.last_val_step == tr.step else None,
        test_metric=test_metric,
        test_acc=test_metric if acc else None,
        epoch_s=epoch_s,
    )
    tr.history.append(record)
    tr.epoch = epoch + 1
    _check(tr, epoch, train_loss, feas_raw, test_metric)
    return record


def _time_to_target(tr: Training, target: float | None) -> tuple[int | None, float | None]:
    """(steps, training seconds) at the first logged evaluation reaching ``target``."""
    if target is None:
        return None, None
    import pandas as pd

    from .stats import time_to_target

    steps = pd.DataFrame([h for h in tr.history if h["kind"] == "step"], columns=HISTORY_COLUMNS)
    hit = time_to_target(steps, target, tr.higher_is_better)
    return hit if hit is not None else (None, None)


def _test_at_best_val(tr: Training, final_test: float) -> float | None:
    """Test metric of the weights kept at the best validation evaluation (scored once, at
    the end of the run); the model is left with its final weights."""
    if tr.best_state is None:
        return None
    if tr.best_step == tr.step:
        return final_test  # the final weights are the best ones
    final = {k: t.detach().clone() for k, t in tr.model.state_dict().items()}
    tr.model.load_state_dict(tr.best_state)
    try:
        return evaluate(tr.model, tr.task, tr.device, amp=tr.amp)
    finally:
        tr.model.load_state_dict(final)


def final_metrics(tr: Training) -> dict:
    """The trained model's columns of ``runs.csv``: test metric (and after exact
    projection, and with the weights of the best validation evaluation), validation
    metrics, time to target, last training loss and feasibility, how far the recurrent
    weights moved, the whole run's training throughput, the optimiser's counters and, for
    classification, the test confusion matrix."""
    task, device = tr.task, tr.device
    epochs = [h for h in tr.history if h["kind"] == "epoch"]
    last = epochs[-1] if epochs else {}
    test_metric, preds = evaluate(tr.model, task, device, with_predictions=True, amp=tr.amp)
    proj = evaluate(projected_model(tr.model, tr.built), task, device, amp=tr.amp)
    acc = task.metric == "acc"
    target = target_value(tr.cfg, task)
    steps_to, seconds_to = _time_to_target(tr, target)
    row = {
        "test_metric": test_metric,
        "test_metric_projected": proj,
        "test_acc": test_metric if acc else None,
        "test_acc_projected": proj if acc else None,
        "val_metric": tr.last_val,
        "best_val_metric": tr.best_val,
        "best_val_step": tr.best_step,
        "test_metric_at_best_val": _test_at_best_val(tr, test_metric),
        "target_value": target,
        "steps_to_target": steps_to,
        "seconds_to_target": seconds_to,
        "train_loss": last.get("train_loss"),
        "feasibility_raw": last.get("feasibility_raw"),
        "feasibility_eff": last.get("feasibility_eff"),
        "train_s": tr.elapsed,
        "train_samples_per_s": tr.samples / tr.elapsed if tr.elapsed > 0 else None,
        "recurrent_change": recurrent_change(tr.start_weights, tr.built),
        **tr.built.counters(tr.optimizer),
        "weight_path": tr.built.weight_path(),
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

    It holds only tensors, numbers and strings (model, optimiser, schedule and gradient
    scaler ``state_dict``, the epoch, step and samples done, the history rows, the training
    seconds, the latest and the best validation metric with the best weights) and is read with
    ``torch.load(..., weights_only=True)``: a file there that needs anything else (a
    crafted pickle carrying a callable, a foreign file) is refused with one line on
    stderr, never executed, and the run starts afresh.  Written to a temporary file and
    renamed, so a kill never leaves half a checkpoint.
    """

    KEYS = (
        "model",
        "optimizer",
        "epoch",
        "history",
        "elapsed",
        "step",
        "samples",
        "scheduler",
        "scaler",
        "val",
    )

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
                "step": tr.step,
                "samples": tr.samples,
                "scheduler": tr.scheduler.state_dict() if tr.scheduler is not None else None,
                "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
                "val": {
                    "last": tr.last_val,
                    "last_step": tr.last_val_step,
                    "best": tr.best_val,
                    "best_step": tr.best_step,
                    "best_state": tr.best_state,
                },
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
        if tr.scheduler is not None and state["scheduler"] is not None:
            tr.scheduler.load_state_dict(state["scheduler"])
        if tr.scaler is not None and state["scaler"] is not None:
            tr.scaler.load_state_dict(state["scaler"])
        tr.epoch, tr.history, tr.elapsed = (
            int(state["epoch"]),
            list(state["history"]),
            float(state["elapsed"]),
        )
        tr.step, tr.samples = int(state["step"]), int(state["samples"])
        val = state["val"]
        tr.last_val, tr.last_val_step = val["last"], val["last_step"]
        tr.best_val, tr.best_step, tr.best_state = val["best"], val["best_step"], val["best_state"]
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

    ``progress``: optional callable ``progress(done_batches, total_batches, epoch)``, called
    after every optimiser step; it may return the seconds it was held (e.g. at the timing
    gate while a neighbour measures), which are left out of the training time.
    ``checkpoint_dir``: when given, the state after each epoch is saved there and an
    interrupted run continues from its last checkpoint (see :class:`Checkpoint`).

    The run uses ``cfg.threads`` torch threads (set here, the caller's count restored after),
    so its arithmetic is the same whichever executor, packing or process runs it.
    The configuration columns ``val_size``, ``log_every``, ``eval_every`` and ``seq_len`` of the
    row hold the values the run used (:func:`resolved_fields`), whatever its status;
    ``run_id`` is the configuration's as given.
    ``timing_lock``: optional context-manager factory held around the throughput
    measurement (:meth:`bench.gate.TimingGate.exclusive`: no neighbour computes meanwhile);
    ``timing_exclusive`` in the row says whether one was held.
    """
    t_start = time.perf_counter()
    row = {**asdict(cfg), "run_id": cfg.run_id, "status": "ok", "error": "", "diverged_epoch": None}
    tr = None
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads)  # part of the configuration: never the executor's choice
        task = get_task(cfg, data_dir)
        row.update(metric=task.metric, baseline=task.baseline, n_train=task.n_train, n_test=task.n_test)
        row.update(resolved_fields(cfg, task), target_value=target_value(cfg, task))
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
    finally:
        torch.set_num_threads(threads_before)
    row["wall_s"] = time.perf_counter() - t_start
    return row, (tr.history if tr is not None else [])
