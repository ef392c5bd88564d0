"""Sweep methods over a grid and record accuracy, feasibility and throughput.

Usage::

    python -m bench.ablate --penalty 0.1 0.5 1.0                 # every method, notebook setting
    python -m bench.ablate --profile smoke --methods lstm cd --data-dir ../shared/data
    python -m bench.ablate --list-methods                        # the registry: maths and references

The grid is the cartesian product of the list-valued flags; ``--penalty`` multiplies
only the methods that use a penalty.  Flags left out take the task's profile
(``bench.tasks.TASKS[task].profiles``).  Results go to ``--out`` (default
``results/<task>-<profile>/``): runs.csv, history.csv, meta.json, PNG plots and
summary.md.  Runs already recorded ``ok`` there are skipped (``--force`` reruns them).

Exit status: 0 when every planned run is ``ok``, 3 when some diverged or failed,
2 on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import torch

from .cli import Parser, choice, number
from .errors import DataError, FolderBusy, UsageError
from .executors import make_executor
from .methods import METHODS
from .provenance import environment, git_commit, utc_now, write_meta
from .runner import RunConfig, get_task
from .store import ResultStore
from .tasks import PROFILES, TASKS, default_data_dir

__all__ = ["EXIT_BAD_INPUT", "EXIT_NOT_ALL_OK", "UsageError", "build_parser", "main", "make_plan"]

EXIT_BAD_INPUT, EXIT_NOT_ALL_OK = 2, 3
DEFAULT_TASK = "smnist"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bench.ablate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    positive = lambda name: number(name, int, minimum=0, strict=True)  # noqa: E731
    p.add_argument("--methods", nargs="+", type=choice("method", METHODS), help="default: all")
    p.add_argument("--task", nargs="+", type=choice("task", TASKS), help=f"default: {DEFAULT_TASK}")
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
        "--device", nargs="+", type=choice("device", ["cpu", "cuda", "auto"]), help="default: auto"
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
        help="timed steps for the throughput columns; default: from the profile",
    )
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $BENCH_DATA_DIR or ./data)")
    p.add_argument("--out", default=None, help="output folder (default: results/<task>-<profile>)")
    p.add_argument("--force", action="store_true", help="rerun runs already recorded ok")
    p.add_argument(
        "--checkpoints", action="store_true", help="save a checkpoint after every epoch; resume from it"
    )
    p.add_argument("--no-plots", action="store_true", help="skip plots and summary.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        help="torch threads of each run (auto: default 1, more when runs are fewer than cores)",
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
        lines += [
            f"{m.name}  ({kind}; granularity {', '.join(m.granularities)}{missing})",
            f"    {m.math}",
            f"    {m.reference}",
        ]
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
        for m, layers, hidden, dev, seed, epochs, bs, lr, lrc, gran, seq_len in grid:
            meth = METHODS[m]
            if gran not in meth.granularities:
                note = f"method {m} skipped for granularity {gran}: supports {', '.join(meth.granularities)}"
                if note not in notices:
                    notices.append(note)
                continue
            for pen in (args.penalty or [0.5]) if meth.uses_penalty else [None]:
                plan.append(
                    RunConfig(
                        method=m,
                        task=task,
                        seed=seed,
                        num_layers=layers,
                        hidden_size=hidden,
                        bidirectional=single("bidirectional", "bidirectional"),
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
                    )
                )
    seen, unique = set(), []
    for cfg in plan:
        if cfg.run_id not in seen:
            seen.add(cfg.run_id)
            unique.append(cfg)
    return unique, notices, profile


def _print_plan(plan, done, notices, out, packing=()):
    for n in notices:
        print(f"note: {n}")
    todo = [c for c in plan if c.run_id not in done]
    print(
        f"plan: {len(plan)} runs into {out} ({len(plan) - len(todo)} already ok, skipped; {len(todo)} to run)"
    )
    for line in packing:
        print(f"  {line}")
    for c in plan:
        mark = "skip" if c.run_id in done else "run "
        pen = "" if c.penalty_param is None else f" penalty_param={c.penalty_param:g}"
        print(
            f"  {mark} {c.run_id} {c.method:<16} {c.task} L={c.num_layers} H={c.hidden_size} "
            f"{'bi' if c.bidirectional else 'uni'} {c.granularity}{pen} seed={c.seed} epochs={c.epochs} "
            f"bs={c.batch_size} lr={c.lr:g} {c.device}"
        )
    return todo


def _sweep(
    store: ResultStore, executor, plan, notices, profile, args, argv, data_dir, out
) -> tuple[dict, int]:
    """Run the planned runs not yet ``ok`` in ``store``; returns ({run_id: status}, runs skipped)."""
    done = store.prepare({c.run_id for c in plan}, force=args.force)
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
        if not plan:
            raise UsageError("the grid is empty: no method applies to the chosen granularity/methods")
        data_dir = args.data_dir or default_data_dir()
        for cfg in {(c.task, c.train_subset, c.test_subset, c.seq_len): c for c in plan}.values():
            get_task(cfg, data_dir)  # fail now, before anything is written, if data is missing
        tasks = sorted({c.task for c in plan})
        out = Path(args.out or Path("results") / f"{'+'.join(tasks)}-{profile}")
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
            results, skipped = _sweep(store, executor, plan, notices, profile, args, argv, data_dir, out)
    except (FolderBusy, UsageError) as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
