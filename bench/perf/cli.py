"""``python -m bench.perf``: the command line of the micro-benchmarks (``nox -s perf``).

Usage::

    python -m bench.perf [--quick] [--methods M ...] [--hidden H ...] [--batch B ...]
                         [--device cpu cuda] [--rounds R] [--warmup W] [--max-seconds S]
                         [--out results/perf] [--dry-run] [--paired]

Without ``--paired``: plan the grid (:mod:`bench.perf.plan`, measuring one warm-up step
of each configuration for the estimate), run pytest-benchmark on it
(:mod:`bench.perf.run`), write ``table.csv``, ``table.md``, ``relative_throughput.png``,
``scaling.png`` and ``command.txt`` (:mod:`bench.perf.report`).  With ``--paired``: time
the methods interleaved (:mod:`bench.perf.paired`) and write ``paired.csv``,
``pairs.csv``, ``paired.md`` and ``paired_command.txt``.  Both tables carry ``kernel_ops``: the
kernel-launching operators of one step (:func:`bench.measure.count_kernel_ops`, counted after
the timing).

Rounds: ``--warmup`` (default 3 on CPU, 10 on CUDA) warm-up and ``--rounds`` (default
5 on CPU, 30 on CUDA; 40 with ``--paired``) timed rounds per benchmark.  A benchmark
whose measured warm-up step says it would exceed ``--max-seconds`` (default 30) is cut
to one warm-up round and as many timed rounds as fit (at least one); ``table.csv``
lists the rounds each row was measured with.  Bad input: one line, exit status 2.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import torch

from ..cli import Parser, choice, number
from ..errors import UsageError
from ..fsio import check_folder, write_atomic, write_csv
from ..methods import ALIASES, METHODS
from ..provenance import environment_lines
from . import paired, plan, report
from .run import BENCH_DIR, run_benchmarks, time_methods

__all__ = ["main", "parse_args"]

PROG = "python -m bench.perf"


def parse_args(argv=None):
    """The parsed flags; raises :class:`bench.errors.UsageError` (one line) on bad input."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    positive = lambda name: number(name, int, minimum=0, strict=True)  # noqa: E731
    p.add_argument(
        "--methods",
        nargs="+",
        type=choice("method", METHODS, ALIASES),
        default=None,
        help="methods (default: every available one; lstm is an alias of unconstrained)",
    )
    p.add_argument(
        "--hidden",
        nargs="+",
        type=positive("hidden"),
        default=None,
        help=f"hidden sizes (default {plan.HIDDEN})",
    )
    p.add_argument(
        "--batch", nargs="+", type=positive("batch"), default=None, help=f"batch sizes (default {plan.BATCH})"
    )
    p.add_argument(
        "--device",
        nargs="+",
        type=choice("device", ["cpu", "cuda"]),
        default=None,
        help="devices (default: cpu, and cuda when available)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"hidden {plan.QUICK_HIDDEN}, batch {plan.QUICK_BATCH} (--hidden/--batch still win)",
    )
    p.add_argument(
        "--rounds",
        type=positive("rounds"),
        default=None,
        help="timed rounds (default 5 CPU, 30 CUDA; 40 with --paired)",
    )
    p.add_argument(
        "--warmup",
        type=number("warmup", int, minimum=0),
        default=None,
        help="warm-up rounds (default 3 CPU, 10 CUDA; 3 with --paired)",
    )
    p.add_argument(
        "--max-seconds",
        type=number("max-seconds", float, minimum=0),
        default=plan.DEFAULT_MAX_SECONDS,
        help="per-benchmark budget: slower benchmarks get 1 warm-up round and fewer timed "
        "rounds (0: no budget)",
    )
    p.add_argument("--out", default="results/perf", help="output folder (default results/perf)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate, run nothing")
    p.add_argument(
        "--paired",
        action="store_true",
        help=f"interleaved, paired timing of the methods against {plan.REFERENCE} (ratios robust to "
        "drifts of the machine's speed) instead of pytest-benchmark; default 40 rounds",
    )
    args = p.parse_args(argv)
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False")
    if not args.dry_run:
        out = check_folder(args.out, f"--out {args.out}")
        try:
            out.mkdir(parents=True, exist_ok=True)
            ok = os.access(out, os.W_OK)
        except OSError:
            ok = False
        if not ok:
            raise UsageError(f"--out {args.out}: cannot create or write to this folder")
    return args


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def print_plan(cases: list[dict]) -> None:
    total = sum(c["est_s"] for c in cases)
    print(
        f"bench.perf: {len(cases)} benchmarks; estimate {_fmt_s(total)} (builds and rounds, from one "
        f"measured warm-up step of each configuration)"
    )
    cut = [c for c in cases if c["cut"]]
    for c in sorted(cases, key=lambda c: -c["est_s"])[:8]:
        print(
            f"  {c['kind']:5s} {plan.case_id(c):34s} ~{c['est_step_s']:.3f} s/round x "
            f"({c['warmup']} warm-up + {c['rounds']} rounds)"
        )
    if cut:
        print(f"  {len(cut)} slow benchmark(s) run with fewer rounds (per-benchmark budget --max-seconds)")
    sys.stdout.flush()


def run_paired(args, argv, methods, hidden, batch, devices, rounds: int, warmup: int) -> int:
    """``--paired``: interleaved ratios for every hidden x batch x device x kind (``methods``
    starting with the reference); writes paired.csv (against the reference), pairs.csv
    (every method against every other), paired.md (both tables) and paired_command.txt."""
    import pandas as pd

    ref = plan.REFERENCE
    rows, pairs = [], []
    for device in devices:
        for h in hidden:
            for b in batch:
                for kind in plan.KINDS:
                    ops = {}
                    times = time_methods(
                        methods, h, b, device, rounds=rounds, warmup=warmup, kind=kind, ops=ops
                    )
                    new = [
                        {
                            "method": r["method"],
                            "device": device,
                            "hidden": h,
                            "batch": b,
                            "kind": kind,
                            "rounds": r["rounds"],
                            "median_ms": r["median_ms"],
                            f"vs_{ref}": r["ratio"],
                            f"vs_{ref}_q1": r["q1"],
                            f"vs_{ref}_q3": r["q3"],
                            f"vs_{ref}_of_medians": r["of_medians"],
                            "kernel_ops": ops[r["method"]],
                        }
                        for r in paired.relative_rows(times, ref)
                    ]
                    rows += new
                    pairs += paired.pairwise_rows(times, device=device, hidden=h, batch=b, kind=kind)
                    print(
                        f"bench.perf --paired: {device} H{h} B{b} {kind}: "
                        + ", ".join(
                            f"{r['method']} {r[f'vs_{ref}']:.3f} ({r['kernel_ops']} ops)" for r in new
                        ),
                        flush=True,
                    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df, dp = pd.DataFrame(rows), pd.DataFrame(pairs)
    write_csv(df, out / "paired.csv")
    write_csv(dp, out / "pairs.csv")
    write_atomic(
        out / "paired.md",
        f"Throughput relative to {ref} (> 1 is faster): median over rounds of t_{ref} / t_method, its\n"
        f"quartiles, and median t_{ref} / median t_method.\n\n"
        + df.to_markdown(index=False, floatfmt=".3f")
        + "\n\nEvery pair: throughput of method relative to baseline, the same statistics.\n\n"
        + dp.to_markdown(index=False, floatfmt=".3f")
        + "\n",
    )
    lines = [shlex.join(["python", "-m", "bench.perf", *argv]), *environment_lines(devices)]
    write_atomic(out / "paired_command.txt", "\n".join(lines) + "\n")
    print(f"bench.perf: wrote {out}/paired.csv, pairs.csv, paired.md, paired_command.txt")
    return 0


def main(argv=None) -> int:
    """Run the micro-benchmarks and write the table, plots and command line; returns
    pytest's exit code (0 when every benchmark passed), 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    methods = args.methods or plan.available_methods()
    missing = [m for m in methods if not METHODS[m].available()]
    if missing:
        print(f"bench.perf: skipping unavailable method(s) {', '.join(missing)}")
        methods = [m for m in methods if m not in missing]
    hidden = args.hidden or (plan.QUICK_HIDDEN if args.quick else plan.HIDDEN)
    batch = args.batch or (plan.QUICK_BATCH if args.quick else plan.BATCH)
    devices = args.device or plan.default_devices()
    if args.paired:
        if plan.REFERENCE not in methods:
            methods = [plan.REFERENCE, *methods]
        rounds, warmup = args.rounds or 40, 3 if args.warmup is None else args.warmup
        cases = plan.make_plan(
            methods, hidden, batch, devices, warmup=warmup, rounds=rounds, max_seconds=None
        )
        est = sum(c["est_s"] for c in cases if c["method"] != plan.REFERENCE)
        print(
            f"bench.perf --paired: {', '.join(methods)} x hidden {' '.join(map(str, hidden))} x batch "
            f"{' '.join(map(str, batch))} x {', '.join(devices)} x train, eval; {warmup} warm-up + {rounds} "
            f"rounds each; estimate {_fmt_s(est)} (from one measured warm-up step of each configuration)"
        )
        if args.dry_run:
            return 0
        return run_paired(args, argv, methods, hidden, batch, devices, rounds, warmup)
    cases = plan.make_plan(
        methods,
        hidden,
        batch,
        devices,
        warmup=args.warmup,
        rounds=args.rounds,
        max_seconds=args.max_seconds or None,
    )
    if not cases:
        print("bench.perf: nothing to run", file=sys.stderr)
        return 2
    print_plan(cases)
    if args.dry_run:
        return 0
    if not BENCH_DIR.is_dir():
        print(f"bench.perf: {BENCH_DIR} not found (run from a source checkout)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "benchmark.json"
    code, wall, pytest_args = run_benchmarks(cases, out, json_path)
    if not json_path.is_file():
        print("bench.perf: pytest wrote no benchmark JSON; no table", file=sys.stderr)
        return code or 1
    df = report.load_results(json_path)
    report.write_tables(df, out)
    report.plot_relative(df, out / "relative_throughput.png")
    report.plot_scaling(df, out / "scaling.png")
    lines = [
        shlex.join(["python", "-m", "bench.perf", *argv]),
        "pytest " + shlex.join(pytest_args) + f"  ({plan.PLAN_ENV}={os.environ[plan.PLAN_ENV]})",
        *environment_lines(devices),
        f"estimated: {_fmt_s(sum(c['est_s'] for c in cases))} (one measured warm-up step per configuration); "
        f"pytest wall time: {_fmt_s(wall)}",
        f"pytest exit code: {code}",
    ]
    write_atomic(out / "command.txt", "\n".join(lines) + "\n")
    print(f"bench.perf: wrote {out}/table.csv, table.md, relative_throughput.png, scaling.png, command.txt")
    return code
