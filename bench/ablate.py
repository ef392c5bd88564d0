"""Sweep methods over a grid and record accuracy, feasibility and throughput.

Usage::

    python -m bench.ablate --penalty 0.1 0.5 1.0                 # every method, notebook setting
    python -m bench.ablate --profile smoke --methods unconstrained cd --data-dir ../shared/data
    python -m bench.ablate --profile smoke --task digits --cell lstm gru rnn
    python -m bench.ablate --list-methods                        # the registry: maths and references

``--methods lstm`` means ``unconstrained`` (the method's name in 0.1.0).

The grid is the cartesian product of the list-valued flags; ``--penalty`` multiplies
only the methods that use a penalty.  Flags left out take the task's profile
(``bench.tasks.TASKS[task].profiles``).  Results go to ``--out`` (default
``results/<task>-<profile>/``): runs.csv, history.csv, meta.json, stats.csv, PNG plots
and summary.md.  Runs already recorded ``ok`` there are skipped (``--force`` reruns
them).  ``--dry-run`` prints the plan and an estimate of its time and writes nothing.

Exit status: 0 when every planned run is ``ok``, 3 when some diverged or failed,
2 on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import statistics
import sys
from pathlib import Path

import torch

from cdcore import support

from .cells import CELLS, DEFAULT_CELL, DEFAULT_INIT, GATES, INITS, MODRELU, NONLINEARITIES
from .cli import Parser, choice, number
from .errors import DataError, FolderBusy, UsageError
from .executors import make_executor
from .methods import ALIASES, METHODS, OPTIMIZERS
from .packing import physical_cores
from .provenance import environment, git_commit, read_meta, utc_now, write_meta
from .runner import AMP_MODES, SCHEDULES, RunConfig, get_task, normalized, resolved_fields
from .store import ResultStore
from .tasks import PROFILES, TASKS, default_data_dir

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_ALL_OK",
    "UsageError",
    "build_parser",
    "main",
    "make_plan",
    "resolve_plan",
]

EXIT_BAD_INPUT, EXIT_NOT_ALL_OK = 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
DEFAULT_TASK = "smnist"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bench.ablate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    positive = lambda name: number(name, int, minimum=0, strict=True)  # noqa: E731
    p.add_argument(
        "--methods",
        nargs="+",
        type=choice("method", METHODS, ALIASES),
        help="default: all (lstm is an alias of unconstrained)",
    )
    p.add_argument(
        "--task", nargs="+", type=choice("task", TASKS), help=f"{', '.join(TASKS)}; default: {DEFAULT_TASK}"
    )
    p.add_argument(
        "--profile",
        type=choice("profile", [*PROFILES, "auto"]),
        default=None,
        help="smoke, quick, paper, or auto (paper on CUDA, quick otherwise); default: paper",
    )
    p.add_argument(
        "--penalty",
        nargs="+",
        type=number("penalty_param", float, minimum=0),
        help="penalty_param values (penalty methods only); default 0.5",
    )
    p.add_argument("--layers", nargs="+", type=positive("layers"), help="default: from the profile")
    p.add_argument("--hidden", nargs="+", type=positive("hidden size"), help="default: from the profile")
    p.add_argument(
        "--device",
        nargs="+",
        type=choice("device", ["cpu", "cuda", "auto"]),
        help="cpu, cuda, auto; default: auto",
    )
    p.add_argument("--seeds", nargs="+", type=number("seed", int), help="default: 0")
    p.add_argument("--epochs", nargs="+", type=positive("epochs"), help="default: from the profile")
    p.add_argument("--batch-size", nargs="+", type=positive("batch size"), help="default: from the profile")
    p.add_argument(
        "--lr", nargs="+", type=number("lr", float, minimum=0, strict=True), help="default: from the profile"
    )
    p.add_argument(
        "--lr-constrained",
        nargs="+",
        type=number("lr-constrained", float, minimum=0, strict=True),
        help="learning rate of the constrained weights; default: same as --lr",
    )
    p.add_argument(
        "--granularity",
        nargs="+",
        type=choice("granularity", ["stacked", "per_gate"]),
        help="default: stacked",
    )
    p.add_argument(
        "--cell",
        nargs="+",
        type=choice("cell", CELLS),
        help=f"recurrent cell(s): {', '.join(CELLS)}; default: {DEFAULT_CELL}",
    )
    p.add_argument(
        "--nonlinearity",
        nargs="+",
        type=choice("nonlinearity", NONLINEARITIES),
        help="the rnn cell's nonlinearity (tanh, relu: nn.RNN; modrelu: bench.cells.ModReLURNN, one "
        "unidirectional layer, a Python loop over time; --cell rnn only); default: tanh",
    )
    p.add_argument(
        "--init",
        nargs="+",
        type=choice("init", INITS),
        help="initialisation of the recurrent weights, the same for every method (default: PyTorch's; "
        "orthogonal, henaff, cayley: see bench.cells)",
    )
    p.add_argument(
        "--optimizer",
        nargs="+",
        type=choice("optimizer", OPTIMIZERS),
        help="optimiser of the whole model (adam, rmsprop; cayley: its Riemannian version); default: adam",
    )
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--seq-len",
        nargs="+",
        type=positive("seq-len"),
        help=f"tasks {', '.join(_tasks_with('seq_len'))} only",
    )
    p.add_argument(
        "--train-subset",
        type=positive("train-subset"),
        help="default: from the profile (copying/adding: batches per epoch)",
    )
    p.add_argument("--test-subset", type=positive("test-subset"), help="default: from the profile")
    p.add_argument(
        "--perf-iters",
        type=positive("perf-iters"),
        help="timed rounds of the steady-state throughput columns; default: from the profile",
    )
    p.add_argument(
        "--val-size",
        type=number("val-size", int, minimum=0),
        help="validation examples held out (0: none); default: the task's (MNIST: the last 5,000 "
        "training images)",
    )
    p.add_argument(
        "--log-every",
        type=positive("log-every"),
        help="log every K optimiser steps; default: at least 50 logged steps per run",
    )
    p.add_argument(
        "--eval-every",
        type=positive("eval-every"),
        help="validation metric every K optimiser steps; default: about 10 per run, at least one per epoch",
    )
    p.add_argument(
        "--target",
        type=number("target", float),
        help="validation metric to reach for steps/seconds to target; default: the task's for the profile",
    )
    p.add_argument(
        "--schedule",
        nargs="+",
        type=choice("schedule", SCHEDULES),
        help=f"learning-rate schedule ({', '.join(SCHEDULES)}), stepped per optimiser step on every group; "
        "default: constant",
    )
    p.add_argument(
        "--clip",
        nargs="+",
        type=number("clip", float, minimum=0, strict=True),
        help="clip the gradient norm of all parameters to this before each step; default: no clipping",
    )
    p.add_argument(
        "--weight-decay",
        nargs="+",
        type=number("weight-decay", float, minimum=0),
        help="L2 weight decay of the parameters other than the recurrent weights; default: 0",
    )
    p.add_argument(
        "--amp",
        nargs="+",
        type=choice("amp", AMP_MODES),
        help="mixed precision: off, bf16 (autocast, CPU and CUDA), fp16 (autocast + GradScaler, CUDA "
        "only); default: off",
    )
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $BENCH_DATA_DIR or ./data)")
    p.add_argument("--out", default=None, help="output folder (default: results/<task>-<profile>)")
    p.add_argument("--force", action="store_true", help="rerun runs already recorded ok")
    p.add_argument(
        "--checkpoints", action="store_true", help="save a checkpoint after every epoch; resume from it"
    )
    p.add_argument("--no-plots", action="store_true", help="skip plots and summary.md")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (bars on a terminal, one-line messages otherwise)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (runs, runs already ok) and an estimate of its time; write nothing",
    )
    p.add_argument(
        "--executor",
        type=choice("executor", ["auto", "local", "dask"]),
        default="auto",
        help="auto: runs packed onto this machine's cores and GPUs (default); local: one at a time "
        "in this process; dask: a Dask cluster (docs/dask.md)",
    )
    p.add_argument("--scheduler", default=None, help="dask scheduler address (with --executor dask)")
    p.add_argument(
        "--workers",
        type=positive("workers"),
        default=None,
        help="auto: CPU worker processes (default: from the physical cores); dask: start a "
        "LocalCluster of N workers",
    )
    p.add_argument(
        "--threads-per-run",
        type=positive("threads-per-run"),
        default=None,
        help="torch threads of each run, part of its configuration (run_id) on every executor; default 1",
    )
    p.add_argument(
        "--runs-per-gpu",
        type=_runs_per_gpu,
        default="auto",
        help="concurrent runs per CUDA device with --executor auto: N, or auto (from measured memory)",
    )
    p.add_argument(
        "--list-methods",
        action="store_true",
        help="print every registered method (maths, reference, granularities) and exit",
    )
    return p


def _runs_per_gpu(s: str):
    if s == "auto":
        return s
    try:
        return number("runs-per-gpu", int, minimum=0, strict=True)(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"runs-per-gpu must be auto or a positive integer; got {s!r}"
        ) from None


def _tasks_with(option: str) -> list[str]:
    return [name for name, spec in TASKS.items() if option in spec.options]


def list_methods() -> str:
    """The method registry as text: key, kind, granularities, what W is, the reference."""
    lines = []
    for m in METHODS.values():
        kind = "constrained" if m.constrained else "unconstrained"
        if m.uses_penalty:
            kind += ", uses penalty_param"
        missing = "" if m.available() else f"; needs {m.requires!r} (not installed)"
        alias = "".join(f"; alias {a}" for a, v in ALIASES.items() if v == m.name)
        lines += [
            f"{m.name}  ({kind}; granularity {', '.join(m.granularities)}{alias}{missing})",
            f"    {m.math}",
            f"    {m.reference}",
        ]
    lines.append(
        f"Every method runs on every cell ({', '.join(CELLS)}; --cell); a vanilla rnn has no gates: "
        f"granularity stacked only."
    )
    return "\n".join(lines)


def resolve_profile(name: str | None) -> tuple[str, str]:
    """(profile, reason)."""
    if name in (None, "auto"):
        if name is None:
            return "paper", "default profile"
        if torch.cuda.is_available():
            return "paper", f"CUDA is available ({torch.cuda.get_device_name(0)})"
        return "quick", "no CUDA device: the paper profile would take hours on a CPU"
    return name, "chosen with --profile"


def make_plan(args) -> tuple[list[RunConfig], list[str], str]:
    """The grid as RunConfigs, notices about skipped combinations, and the profile."""
    profile, reason = resolve_profile(args.profile)
    notices = [f"profile {profile}: {reason}"]
    avail = []
    for m in args.methods or list(METHODS):
        if METHODS[m].available():
            avail.append(m)
        else:
            notices.append(
                f"method {m} skipped: package {METHODS[m].requires!r} is not installed "
                f"(pip install 'cdbench[ref]')"
            )
    devices = []
    for d in args.device or ["auto"]:
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        remote = args.executor == "dask" and args.scheduler  # the workers' GPUs, not the driver's
        if d == "cuda" and not torch.cuda.is_available() and not remote:
            raise UsageError("device 'cuda' asked for but CUDA is not available; allowed here: cpu, auto")
        if d not in devices:
            devices.append(d)
    tasks = args.task or [DEFAULT_TASK]
    if args.seq_len and any("seq_len" not in TASKS[t].options for t in tasks):
        raise UsageError(
            f"--seq-len applies to tasks {', '.join(_tasks_with('seq_len'))} only; got --task "
            f"{' '.join(tasks)}"
        )
    cell_list = list(dict.fromkeys(args.cell or [DEFAULT_CELL]))
    if args.nonlinearity and "rnn" not in cell_list:
        raise UsageError(f"--nonlinearity applies to --cell rnn only; got --cell {' '.join(cell_list)}")
    plan = []
    for task in tasks:
        spec = TASKS[task]
        base = spec.profiles[profile]

        def pick(flag, key):
            v = getattr(args, flag)
            return v if v is not None else [base[key]]

        def single(flag, key):
            v = getattr(args, flag)
            return v if v is not None else base[key]

        seq_lens = pick("seq_len", "seq_len") if "seq_len" in spec.options else [None]
        grid = itertools.product(
            cell_list,
            args.init or [DEFAULT_INIT],
            args.optimizer or ["adam"],
            avail,
            pick("layers", "num_layers"),
            pick("hidden", "hidden_size"),
            devices,
            args.seeds or [0],
            pick("epochs", "epochs"),
            pick("batch_size", "batch_size"),
            pick("lr", "lr"),
            args.lr_constrained or [None],
            args.granularity or ["stacked"],
            seq_lens,
        )
        for cell, init, opt, m, layers, hidden, dev, seed, epochs, bs, lr, lrc, gran, seq_len in grid:
            meth = METHODS[m]
            note = None
            if gran != "stacked" and GATES[cell] == 1:
                note = (
                    f"cell {cell} skipped for granularity {gran}: a vanilla rnn has no gates (its H x H "
                    f"recurrent weight is one block: stacked only)"
                )
            elif gran not in meth.granularities:
                note = f"method {m} skipped for granularity {gran}: supports {', '.join(meth.granularities)}"
            if note is not None:
                if note not in notices:
                    notices.append(note)
                continue
            nonlinearities = (args.nonlinearity or ["tanh"]) if cell == "rnn" else ["tanh"]
            bidirectional = single("bidirectional", "bidirectional")
            if MODRELU in nonlinearities and (layers != 1 or bidirectional):
                raise UsageError(
                    f"--nonlinearity modrelu is one unidirectional layer (bench.cells.ModReLURNN); got "
                    f"--layers {layers}{' and bidirectional' if bidirectional else ''}; allowed: --layers 1 "
                    f"--no-bidirectional"
                )
            for pen, nonlin in itertools.product(
                (args.penalty or [0.5]) if meth.uses_penalty else [None], nonlinearities
            ):
                plan.append(
                    RunConfig(
                        method=m,
                        task=task,
                        seed=seed,
                        num_layers=layers,
                        hidden_size=hidden,
                        bidirectional=bidirectional,
                        granularity=gran,
                        penalty_param=pen,
                        epochs=epochs,
                        batch_size=bs,
                        lr=lr,
                        lr_constrained=lrc,
                        device=dev,
                        profile=profile,
                        train_subset=single("train_subset", "train_subset"),
                        test_subset=single("test_subset", "test_subset"),
                        seq_len=seq_len,
                        perf_iters=single("perf_iters", "perf_iters"),
                        cell=cell,
                        init=init,
                        optimizer=opt,
                        nonlinearity=nonlin,
                        threads=args.threads_per_run or 1,
                    )
                )
    plan = _with_recipe(plan, args)
    seen, unique = set(), []
    for cfg in plan:
        if cfg.run_id not in seen:
            seen.add(cfg.run_id)
            unique.append(cfg)
    return unique, notices, profile


def _with_recipe(plan: list[RunConfig], args) -> list[RunConfig]:
    """Each planned run once per combination of the recipe flags (--schedule, --clip,
    --weight-decay, --amp), with --val-size, --log-every, --eval-every and --target set.

    Raises
    ------
    UsageError
        ``--amp fp16`` with a device other than cuda in the plan; ``--amp bf16`` with a cell whose
        plain ``torch.nn`` module cannot run bf16 autocast on this CPU
        (:func:`cdcore.support.autocast_unsupported`: oneDNN has no bf16 LSTM primitive on an
        AVX2-only CPU) and a cpu run in the plan.
    """
    amps = args.amp or ["off"]
    if "fp16" in amps and any(c.device != "cuda" for c in plan):
        devices = sorted({c.device for c in plan if c.device != "cuda"})
        raise UsageError(
            f"--amp fp16 needs --device cuda (float16 training uses a CUDA GradScaler); the plan has "
            f"device {', '.join(devices)}; allowed there: off, bf16"
        )
    remote = args.executor == "dask" and args.scheduler  # runs on the workers' CPUs, not this one
    if "bf16" in amps and not remote:
        # the nn module a cell runs (modrelu: a Python loop of plain ops, no fused kernel)
        for cell in sorted({c.cell for c in plan if c.device == "cpu" and c.nonlinearity != MODRELU}):
            reason = support.autocast_unsupported(cell, "cpu", torch.bfloat16)
            if reason:
                raise UsageError(
                    f"--amp bf16 with --cell {cell} on this CPU: {reason}; allowed here: --amp off"
                )
    single = {
        "log_every": args.log_every,
        "eval_every": args.eval_every,
        "target": args.target,
    }
    single = {k: v for k, v in single.items() if v is not None}
    recipe = itertools.product(
        args.schedule or ["constant"], args.clip or [None], args.weight_decay or [0.0], amps
    )
    recipe = list(recipe)

    def val_size(cfg: RunConfig) -> int:
        # written into the configuration (so into run_id): 0, 0.1.0's behaviour, is the field's default
        if args.val_size is not None:
            return args.val_size
        return TASKS[cfg.task].default_val_size(cfg.test_subset)

    return [
        dataclasses.replace(cfg, schedule=s, clip=c, weight_decay=wd, amp=a, val_size=val_size(cfg), **single)
        for cfg in plan
        for s, c, wd, a in recipe
    ]


def resolve_plan(plan: list[RunConfig], data_dir, target=None) -> tuple[list[RunConfig], dict]:
    """Load each task of ``plan`` once (failing now, before anything is written, if its data is
    missing), normalise every run (:func:`bench.runner.normalized`: a given value equal to the
    automatic one is made automatic, so both commands plan one run_id) and resolve its
    task-dependent configuration columns (:func:`bench.runner.resolved_fields`).

    Returns
    -------
    (list of RunConfig, dict)
        The normalised plan (plan order, each run_id once) and ``{run_id: resolved fields}``,
        which the sweep writes into the row of a run that failed without them (a dead worker).

    Raises
    ------
    UsageError
        ``target`` out of the range of a task's metric (:func:`_check_target`); ``--eval-every``
        or ``--target`` for a task without a validation split (:func:`_check_no_validation`).
    DataError
        A task's data is missing.
    """
    by_data: dict[tuple, list[int]] = {}
    for i, c in enumerate(plan):
        by_data.setdefault((c.task, c.train_subset, c.test_subset, c.seq_len, c.val_size), []).append(i)
    out, resolved = list(plan), {}
    for indices in by_data.values():
        task = get_task(plan[indices[0]], data_dir)
        _check_target(target, plan[indices[0]].task, task.metric)
        if task.val is None:
            _check_no_validation(plan[indices[0]])
        for i in indices:
            out[i] = normalized(plan[i], task)
            resolved[out[i].run_id] = resolved_fields(out[i], task)
    unique = list({c.run_id: c for c in reversed(out)}.values())[::-1]  # first of each run_id
    return unique, resolved


def _threads_notice(rows: list[dict], plan: list[RunConfig], done: set) -> list[str]:
    """A note when runs counted as done were recorded with another torch thread count than
    planned: rows written before the threads were part of the configuration (the column
    recorded the process's threads, or nothing in 0.1.0) keep it, so they are skipped under
    the run_id they had and stand apart in the statistics; ``--force`` retrains them."""
    want = {c.run_id: str(c.threads) for c in plan}
    kept = [r for r in rows if r.get("run_id") in done and r["run_id"] in want]
    other = [r for r in kept if str(r.get("threads") or "") != want[r["run_id"]]]
    if not other:
        return []
    recorded = sorted({r.get("threads") or "unknown" for r in other})
    return [
        f"{len(other)} run(s) already ok were trained with {', '.join(recorded)} torch threads (recorded "
        f"before the threads were part of a run's configuration), not the "
        f"{', '.join(sorted(set(want.values())))} planned: kept and skipped, in their own configuration; "
        f"--force retrains them"
    ]


def _oversubscribed_notice(args) -> list[str]:
    """A note when ``--workers N --threads-per-run k`` asks for more torch threads than this
    machine's physical cores (:func:`bench.packing.physical_cores`): allowed, but the runs
    then compete for cores.  Not for a remote dask scheduler (its workers' cores)."""
    n, k = args.workers, args.threads_per_run
    if not n or not k or (args.executor == "dask" and args.scheduler):
        return []
    cores = physical_cores()
    if n * k <= cores:
        return []
    return [
        f"--workers {n} x --threads-per-run {k} = {n * k} torch threads on {cores} physical cores: "
        "oversubscribed, the runs compete for cores and each trains slower"
    ]


def _check_no_validation(cfg: RunConfig) -> None:
    """Refuse ``--eval-every`` / ``--target`` for a run without a validation split
    (``--val-size 0``): only the validation metric is evaluated every K steps, and time to
    target is measured on it alone (:func:`bench.runner.target_value`), so either flag would
    change nothing.  Raises UsageError."""
    flags = {"--eval-every": cfg.eval_every, "--target": cfg.target}
    given = [f"{flag} {value:g}" for flag, value in flags.items() if value is not None]
    if given:
        raise UsageError(
            f"{' and '.join(given)} with --val-size {cfg.val_size}: task {cfg.task} then has no "
            "validation split, and only the validation metric is evaluated every K steps and "
            "compared with the target; use --val-size N (N > 0) or drop the flag"
        )


def _check_target(target: float | None, task: str, metric: str) -> None:
    """Refuse a ``--target`` its task's metric can never reach: accuracy is a fraction in
    (0, 1], cross-entropy and mean squared error are positive.  Raises UsageError."""
    if target is None:
        return
    if metric == "acc" and not 0 < target <= 1:
        raise UsageError(
            f"--target {target:g}: task {task} measures accuracy as a fraction; "
            f"allowed: 0 < target <= 1 (e.g. 0.98 for 98%)"
        )
    if target <= 0:
        raise UsageError(f"--target {target:g}: task {task} measures {metric}; allowed: target > 0")


def _print_plan(plan, done, notices, out, packing=()):
    for n in notices:
        print(f"note: {n}")
    todo = [c for c in plan if c.run_id not in done]
    print(
        f"plan: {len(plan)} run{'s' * (len(plan) != 1)} into {out} "
        f"({len(plan) - len(todo)} already ok, skipped; {len(todo)} to run)"
    )
    for line in packing:
        print(f"  {line}")
    for c in plan:
        mark = "skip" if c.run_id in done else "run "
        pen = "" if c.penalty_param is None else f" penalty_param={c.penalty_param:g}"
        cell = f"{c.cell}({c.nonlinearity})" if c.cell == "rnn" else c.cell
        lrc = "" if c.lr_constrained is None else f" lr_constrained={c.lr_constrained:g}"
        print(
            f"  {mark} {c.run_id} {c.method:<16} {cell:<9} {c.task} L={c.num_layers} H={c.hidden_size} "
            f"{'bi' if c.bidirectional else 'uni'} {c.granularity}{pen} seed={c.seed} epochs={c.epochs} "
            f"bs={c.batch_size} lr={c.lr:g}{lrc} {c.device}{_recipe_text(c)}"
        )
    return todo


def _recipe_text(c: RunConfig) -> str:
    """`` schedule=onecycle clip=1 ...``: the fields added after 0.1.0 that are not at their default
    (the cell and its nonlinearity have their own column)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    parts = []
    for name in sorted(RunConfig.ADDED_FIELDS - {"cell", "nonlinearity"}):
        v = getattr(c, name)
        if v != defaults[name]:
            parts.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
    return "".join(f" {p}" for p in parts)


# ---------------------------------------------------------------------------------------
# --dry-run: the plan and an estimate of its time


def _shape(
    method,
    task,
    num_layers,
    hidden_size,
    bidirectional,
    granularity,
    batch_size,
    device,
    seq_len,
    amp,
    cell="lstm",
    nonlinearity="tanh",
):
    # the cell and its nonlinearity are part of the shape: at one size their steps cost 1x to 3x each other
    return tuple(
        str(v)
        for v in (
            method,
            task,
            num_layers,
            hidden_size,
            bidirectional,
            granularity,
            batch_size,
            device,
            seq_len,
            amp,
            cell,
            nonlinearity,
        )
    )


def _samples(epochs, n_train, batch_size, generated: bool) -> float:
    """Training samples of a run (generated tasks: n_train is batches per epoch)."""
    return float(epochs) * float(n_train) * (float(batch_size) if generated else 1.0)


def _recorded_seconds_per_sample(rows: list[dict], tasks: dict) -> dict:
    """{shape: median over the ok runs of that shape of wall_s / training samples} from runs.csv rows."""
    per = {}
    for r in rows:
        try:
            if r.get("status") != "ok" or r.get("task") not in tasks:
                continue
            key = _shape(
                r["method"],
                r["task"],
                r["num_layers"],
                r["hidden_size"],
                r["bidirectional"],
                r["granularity"],
                r["batch_size"],
                r["device"],
                r["seq_len"],
                r.get("amp") or "off",
                r.get("cell") or "lstm",
                r.get("nonlinearity") or "tanh",
            )
            n = _samples(r["epochs"], r["n_train"], r["batch_size"], tasks[r["task"]].train is None)
            per.setdefault(key, []).append(float(r["wall_s"]) / n)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue  # a row of an older or foreign layout: no estimate from it
    return {k: statistics.median(v) for k, v in per.items()}


def _measured_seconds(cfg: RunConfig, task) -> float:
    """A rough time of ``cfg`` from one warm-up and one timed train step and eval forward
    (``bench.runner.make_steps``): its steps, evaluations (validation, epoch-end tests) and
    throughput rounds."""
    import time

    from .runner import logging_intervals, make_steps

    steps = make_steps(cfg, task)
    timed = {}
    for kind in ("train", "eval"):
        fn = getattr(steps, kind)
        fn()
        t0 = time.perf_counter()
        fn()
        timed[kind] = time.perf_counter() - t0
    per_epoch = -(-task.n_train // cfg.batch_size) if task.train is not None else task.batches_per_epoch
    total = cfg.epochs * per_epoch
    _, eval_every = logging_intervals(cfg, per_epoch)
    evaluations = (total // eval_every + 1) if task.val is not None else 0
    eval_samples = evaluations * task.n_val + (cfg.epochs + 3) * task.n_test
    rounds = 2 * (cfg.perf_iters + 3)  # the step and the paired baseline step
    return (total + rounds) * timed["train"] + eval_samples / steps.batch_size * timed["eval"]


def estimate(todo: list[RunConfig], rows: list[dict], data_dir) -> list[tuple[RunConfig, float, str]]:
    """``(cfg, seconds, source)`` per run to do: from the throughput already recorded in the
    folder for runs of the same shape (method, task, layers, hidden size, direction,
    granularity, batch size, device, sequence length, amp, cell, nonlinearity), scaled by the
    training samples;
    otherwise measured (one train step and one eval forward after a warm-up one)."""
    tasks = {c.task: get_task(c, data_dir) for c in todo}
    recorded = _recorded_seconds_per_sample(rows, tasks)
    measured, out = {}, []
    for c in todo:
        task = get_task(c, data_dir)
        key = _shape(
            c.method,
            c.task,
            c.num_layers,
            c.hidden_size,
            c.bidirectional,
            c.granularity,
            c.batch_size,
            c.device,
            task.seq_len,
            c.amp,
            c.cell,
            c.nonlinearity,
        )
        if key in recorded:
            n = _samples(c.epochs, task.n_train, c.batch_size, task.train is None)
            out.append((c, recorded[key] * n, "recorded"))
        else:
            if key not in measured:
                measured[key] = _measured_seconds(c, task)
            out.append((c, measured[key], "measured"))
    return out


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def dry_run(plan, notices, out: Path, data_dir, force: bool, executor=None) -> int:
    """Print the plan (with ``executor``'s packing when given), the runs already ok in ``out``
    and an estimate of the time of the others; write nothing (``out`` is only read)."""
    from .store import read_rows

    rows = read_rows(out / "runs.csv")
    planned = {c.run_id for c in plan}
    done = set() if force else {r.get("run_id") for r in rows if r.get("status") == "ok"} & planned
    packing = executor.plan([c for c in plan if c.run_id not in done], data_dir) if executor else ()
    todo = _print_plan(plan, done, notices + _threads_notice(rows, plan, done), out, packing)
    est = estimate(todo, rows, data_dir)
    by, per_method = {"recorded": 0, "measured": 0}, {}
    for c, seconds, source in est:
        by[source] += 1
        per_method.setdefault((c.method, source), []).append(seconds)
    for (method, source), secs in per_method.items():
        print(f"  estimate {method:<16} {len(secs)} runs, {_duration(sum(secs))} ({source})")
    total = sum(s for _, s, _ in est)
    print(
        f"estimated time for the {len(todo)} runs to do: about {_duration(total)} "
        "one at a time in one process "
        f"({by['recorded']} from the throughput recorded in {out}, {by['measured']} from one measured step "
        f"each; rough: evaluation included from sizes, not measured)"
    )
    print("dry run: nothing written")
    return 0


def _sweep(
    store: ResultStore, executor, plan, notices, profile, args, argv, data_dir, out, resolved=None
) -> tuple[dict, int]:
    """Run the planned runs not yet ``ok`` in ``store``; returns ({run_id: status}, runs skipped).

    ``resolved``: ``{run_id: fields}`` of :func:`resolve_plan`, written into a row that lacks
    them (a run whose worker died: the executor's row holds the configuration as given)."""
    from .store import read_rows

    read_meta(out)  # a malformed meta.json is refused before the folder is changed
    resolved = resolved or {}
    done = store.prepare({c.run_id for c in plan}, force=args.force)
    notices = notices + _threads_notice(read_rows(out / "runs.csv"), plan, done)
    if args.force:  # rerun from scratch: a checkpoint left by an earlier interrupted run is not resumed
        for c in plan:
            (out / "checkpoints" / f"{c.run_id}.pt").unlink(missing_ok=True)
    packing = executor.plan([c for c in plan if c.run_id not in done], data_dir)
    todo = _print_plan(plan, done, notices, out, packing)
    env = environment(sorted({c.device for c in plan}))
    commit = git_commit()
    write_meta(
        out,
        {
            "command": "python -m bench.ablate " + shlex.join(argv),
            "argv": argv,
            "started": utc_now(),
            "git_commit": commit,
            "profile": profile,
            "notices": notices,
            "executor": executor.describe(),
            "data_dir": str(data_dir),
            "planned_runs": len(plan),
            **env,
        },
    )
    provenance = {"torch_version": env["torch_version"], "git_commit": commit}
    results = {}

    def on_result(cfg, row, history):
        row.update({k: v for k, v in provenance.items() if not row.get(k)})
        row.update({k: v for k, v in resolved.get(cfg.run_id, {}).items() if row.get(k) in (None, "")})
        row.setdefault("device_name", env["device_names"].get(cfg.device))
        store.record(row, history)
        results[cfg.run_id] = row["status"]
        msg = "" if row["status"] == "ok" else f" ({row.get('error')})"
        print(f"[{len(results)}/{len(todo)}] {cfg.run_id} {cfg.method} {row['status']}{msg}", flush=True)

    executor.run(
        todo,
        on_result,
        data_dir=data_dir,
        checkpoint_dir=(out / "checkpoints") if args.checkpoints else None,
        progress=not args.no_progress,
    )
    return results, len(plan) - len(todo)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.list_methods:
            print(list_methods())
            return 0
        if args.executor != "dask" and args.scheduler:
            raise UsageError("--scheduler needs --executor dask")
        if args.executor == "local" and args.workers:
            raise UsageError("--workers needs --executor auto or dask; --executor local runs one at a time")
        if args.executor != "auto" and args.runs_per_gpu != "auto":
            raise UsageError("--runs-per-gpu needs --executor auto")
        plan, notices, profile = make_plan(args)
        notices += _oversubscribed_notice(args)
        if not plan:
            raise UsageError("the grid is empty: no method applies to the chosen granularity/methods")
        data_dir = args.data_dir or default_data_dir()
        plan, resolved = resolve_plan(plan, data_dir, args.target)
        tasks = sorted({c.task for c in plan})
        out = Path(args.out or Path("results") / f"{'+'.join(tasks)}-{profile}")
        if args.dry_run:
            if args.executor == "dask":  # sized by the cluster when the sweep starts: start none here
                print("note: executor dask: the plan of the workers is printed when the sweep starts")
                return dry_run(plan, notices, out, data_dir, args.force)
            planner = make_executor(
                args.executor,
                workers=args.workers,
                threads_per_run=args.threads_per_run,
                runs_per_gpu=args.runs_per_gpu,
            )
            try:
                return dry_run(plan, notices, out, data_dir, args.force, planner)
            finally:
                planner.close()
        executor = make_executor(
            args.executor,
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_run=args.threads_per_run,
            runs_per_gpu=args.runs_per_gpu,
        )
    except (UsageError, DataError, ValueError) as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with ResultStore(out) as store:
            results, skipped = _sweep(
                store, executor, plan, notices, profile, args, argv, data_dir, out, resolved
            )
    except (FolderBusy, UsageError) as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"bench.ablate: interrupted; the runs finished so far are in {out}: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        executor.close()
    if not args.no_plots:
        from . import plot

        plot.make_all(out)
    bad = {k: v for k, v in results.items() if v != "ok"}
    n_div = sum(v == "diverged" for v in bad.values())
    n_fail = sum(v == "failed" for v in bad.values())
    print(
        f"done: {len(results) - len(bad)} ok, {n_div} diverged, {n_fail} failed "
        f"({skipped} skipped as already ok); results in {out}"
    )
    return 0 if not bad else EXIT_NOT_ALL_OK


if __name__ == "__main__":
    sys.exit(main())
