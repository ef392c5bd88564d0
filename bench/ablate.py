"""Sweep methods over a grid and record accuracy, feasibility and throughput.

Usage::

    python -m bench.ablate --penalty 0.1 0.5 1.0                 # every method, notebook setting
    python -m bench.ablate --profile smoke --methods lstm cd --data-dir ../shared/data

The grid is the cartesian product of the list-valued flags; ``--penalty`` multiplies
only the methods that use a penalty.  Results go to ``--out`` (default
``results/<task>-<profile>/``): runs.csv, history.csv, meta.json, PNG plots and
summary.md.  Runs already recorded ``ok`` there are skipped (``--force`` reruns them).

Exit status: 0 when every planned run is ``ok``, 3 when some diverged or failed,
2 on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .methods import METHODS
from .runner import RunConfig
from .store import FolderBusy, ResultStore
from .tasks import TASK_PROFILES, TASKS, DataError, default_data_dir

PROFILES: dict[str, dict] = {
    # seconds on a CPU: a slice of the data, a tiny model; for tests
    "smoke": dict(num_layers=1, hidden_size=16, bidirectional=True, epochs=1, batch_size=64, lr=5e-3,
                  train_subset=512, test_subset=512, perf_iters=5),
    # a meaningful comparison within ~20 minutes on a 2-core CPU: the notebook's model on a
    # quarter of the training set, 2 epochs, scored on the full test set
    "quick": dict(num_layers=2, hidden_size=100, bidirectional=True, epochs=2, batch_size=64, lr=5e-4,
                  train_subset=15000, test_subset=None, perf_iters=10),
    # the reference notebook: 10 epochs, hidden 100, 2 layers, bidirectional, batch 64, all data
    "paper": dict(num_layers=2, hidden_size=100, bidirectional=True, epochs=10, batch_size=64, lr=5e-4,
                  train_subset=None, test_subset=None, perf_iters=50),
}
EXIT_BAD_INPUT, EXIT_NOT_ALL_OK = 2, 3
SEQ_LEN_TASKS = ("copying", "adding")


class UsageError(Exception):
    """Bad input: one line, exit status 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, exit 2
        raise UsageError(message)


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer; got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer; got {s!r}")
        return v
    return parse


def _int(name):
    def parse(s):
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; got {s!r}") from None
    return parse


def _positive_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0; got {s!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0; got {s!r}")
        return v
    return parse


def _penalty(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"penalty_param must be a finite number >= 0; got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"penalty_param must be a finite number >= 0; got {s!r}")
    return v


def _choice(name, allowed):
    def parse(s):
        if s not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {name} {s!r}; allowed: {', '.join(allowed)}")
        return s
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", type=_choice("method", list(METHODS)), help="default: all")
    p.add_argument("--task", nargs="+", type=_choice("task", list(TASKS)), help="default: smnist")
    p.add_argument("--profile", type=_choice("profile", [*PROFILES, "auto"]), default=None,
                   help="smoke, quick, paper, or auto (paper on CUDA, quick otherwise); default: paper")
    p.add_argument("--penalty", nargs="+", type=_penalty, help="penalty_param values (penalty methods only); default 0.5")
    p.add_argument("--layers", nargs="+", type=_positive_int("layers"), help="default: from the profile")
    p.add_argument("--hidden", nargs="+", type=_positive_int("hidden size"), help="default: from the profile")
    p.add_argument("--device", nargs="+", type=_choice("device", ["cpu", "cuda", "auto"]), help="default: auto")
    p.add_argument("--seeds", nargs="+", type=_int("seed"), help="default: 0")
    p.add_argument("--epochs", nargs="+", type=_positive_int("epochs"), help="default: from the profile")
    p.add_argument("--batch-size", nargs="+", type=_positive_int("batch size"), help="default: from the profile")
    p.add_argument("--lr", nargs="+", type=_positive_float("lr"), help="default: from the profile")
    p.add_argument("--lr-constrained", nargs="+", type=_positive_float("lr-constrained"),
                   help="learning rate of the constrained weights; default: same as --lr")
    p.add_argument("--granularity", nargs="+", type=_choice("granularity", ["stacked", "per_gate"]),
                   help="default: stacked")
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seq-len", nargs="+", type=_positive_int("seq-len"), help="copying / adding only")
    p.add_argument("--train-subset", type=_positive_int("train-subset"), help="default: from the profile (copying/adding: batches per epoch)")
    p.add_argument("--test-subset", type=_positive_int("test-subset"), help="default: from the profile")
    p.add_argument("--perf-iters", type=_positive_int("perf-iters"), help="timed steps for the throughput columns; default: from the profile")
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $BENCH_DATA_DIR or ./data)")
    p.add_argument("--out", default=None, help="output folder (default: results/<task>-<profile>)")
    p.add_argument("--force", action="store_true", help="rerun runs already recorded ok")
    p.add_argument("--checkpoints", action="store_true", help="save a checkpoint after every epoch; resume from it")
    p.add_argument("--no-plots", action="store_true", help="skip plots and summary.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--executor", type=_choice("executor", ["local", "dask"]), default="local")
    p.add_argument("--scheduler", default=None, help="dask scheduler address (with --executor dask)")
    p.add_argument("--workers", type=_positive_int("workers"), default=None,
                   help="start a dask LocalCluster of N workers (with --executor dask)")
    return p


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
    methods = args.methods or list(METHODS)
    avail = []
    for m in methods:
        if METHODS[m].available():
            avail.append(m)
        else:
            notices.append(f"method {m} skipped: package {METHODS[m].requires!r} is not installed "
                           f"(pip install 'cdbench[ref]')")
    devices = []
    for d in args.device or ["auto"]:
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        remote = args.executor == "dask" and args.scheduler  # the workers' GPUs, not the driver's
        if d == "cuda" and not torch.cuda.is_available() and not remote:
            raise UsageError("device 'cuda' asked for but CUDA is not available; allowed here: cpu, auto")
        if d not in devices:
            devices.append(d)
    if args.seq_len and any(t not in SEQ_LEN_TASKS for t in args.task or ["smnist"]):
        raise UsageError(f"--seq-len applies to tasks {', '.join(SEQ_LEN_TASKS)} only; got --task "
                         f"{' '.join(args.task or ['smnist'])}")
    plan = []
    for task in args.task or ["smnist"]:
        base = {**PROFILES[profile], **TASK_PROFILES.get(task, {}).get(profile, {})}

        def pick(flag, key):
            v = getattr(args, flag)
            return v if v is not None else [base.get(key)]

        grid = itertools.product(
            avail, pick("layers", "num_layers"), pick("hidden", "hidden_size"), devices, args.seeds or [0],
            pick("epochs", "epochs"), pick("batch_size", "batch_size"), pick("lr", "lr"),
            args.lr_constrained or [None], args.granularity or ["stacked"], pick("seq_len", "seq_len"),
        )
        for m, layers, hidden, dev, seed, epochs, bs, lr, lrc, gran, seq_len in grid:
            meth = METHODS[m]
            if gran not in meth.granularities:
                note = f"method {m} skipped for granularity {gran}: supports {', '.join(meth.granularities)}"
                if note not in notices:
                    notices.append(note)
                continue
            for pen in (args.penalty or [0.5]) if meth.uses_penalty else [None]:
                plan.append(RunConfig(
                    method=m, task=task, seed=seed, num_layers=layers, hidden_size=hidden,
                    bidirectional=args.bidirectional if args.bidirectional is not None else base["bidirectional"],
                    granularity=gran, penalty_param=pen, epochs=epochs, batch_size=bs, lr=lr, lr_constrained=lrc,
                    device=dev, profile=profile,
                    train_subset=args.train_subset if args.train_subset is not None else base.get("train_subset"),
                    test_subset=args.test_subset if args.test_subset is not None else base.get("test_subset"),
                    seq_len=seq_len,
                    perf_iters=args.perf_iters if args.perf_iters is not None else base.get("perf_iters", 20),
                ))
    seen, unique = set(), []
    for cfg in plan:
        if cfg.run_id not in seen:
            seen.add(cfg.run_id)
            unique.append(cfg)
    return unique, notices, profile


def git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices) -> dict:
    from .measure import cpu_count

    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device_names": {d: (torch.cuda.get_device_name(0) if d == "cuda" else cpu_name()) for d in devices},
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
    }


def write_meta(out: Path, meta: dict) -> None:
    path = out / "meta.json"
    previous = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            previous = old.get("invocations", [])
        except (OSError, ValueError):
            previous = []
    meta["invocations"] = previous + [{"command": meta["command"], "started": meta["started"],
                                       "git_commit": meta["git_commit"]}]
    tmp = out / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path)


def _print_plan(plan, done, notices, out):
    for n in notices:
        print(f"note: {n}")
    todo = [c for c in plan if c.run_id not in done]
    print(f"plan: {len(plan)} runs into {out} ({len(plan) - len(todo)} already ok, skipped; {len(todo)} to run)")
    for c in plan:
        mark = "skip" if c.run_id in done else "run "
        pen = "" if c.penalty_param is None else f" penalty_param={c.penalty_param:g}"
        print(f"  {mark} {c.run_id} {c.method:<16} {c.task} L={c.num_layers} H={c.hidden_size} "
              f"{'bi' if c.bidirectional else 'uni'} {c.granularity}{pen} seed={c.seed} epochs={c.epochs} "
              f"bs={c.batch_size} lr={c.lr:g} {c.device}")
    return todo


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.executor == "local" and (args.scheduler or args.workers):
            raise UsageError("--scheduler and --workers need --executor dask")
        plan, notices, profile = make_plan(args)
        if not plan:
            raise UsageError("the grid is empty: no method applies to the chosen granularity/methods")
        data_dir = args.data_dir or default_data_dir()
        from .runner import get_task

        for cfg in {(c.task, c.train_subset, c.test_subset, c.seq_len): c for c in plan}.values():
            get_task(cfg, data_dir)  # fail now, before anything is written, if data is missing
        tasks = sorted({c.task for c in plan})
        out = Path(args.out or Path("results") / f"{'+'.join(tasks)}-{profile}")
        from .executors import make_executor

        executor = make_executor(args.executor, scheduler=args.scheduler, workers=args.workers)
    except UsageError as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, ValueError) as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        store = ResultStore(out).__enter__()
    except FolderBusy as e:
        print(f"bench.ablate: error: {e}", file=sys.stderr)
        executor.close()
        return EXIT_BAD_INPUT
    try:
        done = store.prepare({c.run_id for c in plan}, force=args.force)
        todo = _print_plan(plan, done, notices, out)
        devices = sorted({c.device for c in plan})
        env = environment(devices)
        commit = git_commit()
        write_meta(out, {
            "command": "python -m bench.ablate " + shlex.join(argv), "argv": argv,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit, "profile": profile, "notices": notices, "executor": executor.describe(),
            "data_dir": str(data_dir), "planned_runs": len(plan), **env,
        })
        extra = {"torch_version": env["torch_version"], "git_commit": commit}
        results = {}

        def on_result(cfg, row, history):
            row.update({k: v for k, v in extra.items() if not row.get(k)})
            row.setdefault("device_name", env["device_names"].get(cfg.device))
            row.pop("traceback", None)
            store.record(row, history)
            results[cfg.run_id] = row["status"]
            msg = "" if row["status"] == "ok" else f" ({row.get('error')})"
            print(f"[{len(results)}/{len(todo)}] {cfg.run_id} {cfg.method} {row['status']}{msg}", flush=True)

        executor.run(todo, on_result, data_dir=data_dir,
                     checkpoint_dir=(out / "checkpoints") if args.checkpoints else None,
                     progress=not args.no_progress)
    finally:
        executor.close()
        store.__exit__(None, None, None)
    if not args.no_plots:
        from . import plot

        plot.make_all(out)
    bad = {k: v for k, v in results.items() if v != "ok"}
    n_div = sum(v == "diverged" for v in bad.values())
    n_fail = sum(v == "failed" for v in bad.values())
    print(f"done: {len(results) - len(bad)} ok, {n_div} diverged, {n_fail} failed "
          f"({len(plan) - len(todo)} skipped as already ok); results in {out}")
    return 0 if not bad else EXIT_NOT_ALL_OK


if __name__ == "__main__":
    from bench.ablate import main as _main  # one module instance, hence one UsageError class

    sys.exit(_main())
