"""Packed vs one-at-a-time: the wall time of the same sweep under ``--executor auto`` and
``--executor local``, measured in one sitting (issue 15 item 4).

Usage::

    python -m bench.packbench                      # the scaled-down quick grid, 1 repeat
    python -m bench.packbench --repeats 3          # ABBA order over repeats
    python -m bench.packbench --grid quick         # the quick sweep's own grid (~30 min on 2 cores)
    python -m bench.packbench -- --methods lstm cd # after --: more bench.ablate flags for both sweeps
    python -m bench.packbench --all-threads        # also one at a time with every core's thread
    nox -s packbench -- --repeats 3

Each sweep is a fresh ``python -m bench.ablate`` process writing into its own temporary
folder, timed from its start to its exit, worker start-up and data loading included:
what a user waits for.  Repeats alternate the order (local first, then packed first, ...)
so that a drift of the machine's speed does not favour one side.  Both sides run the same
configurations (one torch thread per run by default: ``RunConfig.threads``), so their runs
have the same run_ids and bit-identical metrics, which the report checks: only the schedule
differs.  The figure is the ratio of wall times, local / packed (> 1: packing is faster), per
repeat and its median; ``--all-threads`` adds a third sweep, one at a time with
``--threads-per-run`` = the physical cores: a *different configuration* (other run_ids, other
metrics in the last digits), reported as such.  The
process tree's CPU time and each run's whole-run training throughput are reported
beside it.  Writes ``<out>/packbench.csv``, ``<out>/packbench.md`` and
``<out>/command.txt`` (the command, the machine and its load average before and after).

The grids: ``quick`` is ``--profile quick`` itself, what ``nox -s bench`` runs on a CPU
(every method, penalty_param 0.1 0.5 1.0: 10 runs of the notebook's model, 2 layers,
bidirectional, hidden 100, batch 64, on 15,000 training images for 2 epochs, the whole test
set, 10 timed steps; about 20 minutes one at a time on 2 cores).  ``scaled`` (default) is the
same grid and run shapes with every per-run amount divided by 5: 3,000 training and 2,000
test images, 2 epochs and 2 timed steps, so that training, evaluation and the exclusive
timing phase (during which a run's neighbours wait) keep the quick sweep's proportions.
"""

from __future__ import annotations

import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cli import Parser, choice, number
from .errors import UsageError

__all__ = ["GRIDS", "main"]

_QUICK = ["--task", "smnist", "--profile", "quick", "--penalty", "0.1", "0.5", "1.0"]
#: the sweeps compared: the quick grid's methods, penalties and run shapes
GRIDS = {
    "scaled": [*_QUICK, "--train-subset", "3000", "--test-subset", "2000", "--perf-iters", "2"],
    "quick": _QUICK,
}
MODES = {"local": ["--executor", "local"], "packed": ["--executor", "auto"]}
#: the columns that must be equal run by run between two sweeps of the same configurations
SAME = ["status", "test_metric", "train_loss", "feasibility_raw", "feasibility_eff", "confusion"]
#: the one-at-a-time side: ``local`` (today's default), or ``one-per-gpu`` (auto packing with one
#: run per GPU: on a multi-GPU machine, the runs-per-GPU 1 against auto comparison)
BASELINES = {"local": ["--executor", "local"], "one-per-gpu": ["--executor", "auto", "--runs-per-gpu", "1"]}


def _sweep(mode: str, flags: list[str], grid: list[str], extra: list[str], data_dir, workdir: Path) -> dict:
    """One sweep in a fresh process: wall seconds, the children's CPU seconds, its rows."""
    import pandas as pd

    out = workdir / mode
    cmd = [sys.executable, "-m", "bench.ablate", *grid, *flags, *extra, "--no-plots", "--no-progress"]
    cmd += ["--out", str(out)] + (["--data-dir", str(data_dir)] if data_dir else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode not in (0, 3):
        raise RuntimeError(f"{mode} sweep failed ({p.returncode}): {p.stderr[-2000:]}")
    runs = pd.read_csv(out / "runs.csv")
    sps = runs["n_train"] * runs["epochs"] / runs["train_s"]
    return runs, {
        "mode": mode,
        "wall_s": wall,
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
        "runs": len(runs),
        "ok": int((runs["status"] == "ok").sum()),
        "packing": ",".join(sorted(set(runs["packing"].astype(str)))) if "packing" in runs else "",
        "threads": ",".join(map(str, sorted(set(runs["threads"])))) if "threads" in runs else "",
        "run_train_samples_per_s_median": float(sps.median()),
        "sum_train_s": float(runs["train_s"].sum()),
        "plan": next((ln.strip() for ln in p.stdout.splitlines() if "executor auto: cpu" in ln), ""),
    }


def identical(a, b) -> bool:
    """Whether two sweeps' runs.csv tables hold the same run_ids with equal :data:`SAME` columns."""
    a, b = (t.set_index("run_id").sort_index() for t in (a, b))
    cols = [c for c in SAME if c in a and c in b]
    return list(a.index) == list(b.index) and a[cols].equals(b[cols])


def _machine() -> list[str]:
    from .packing import physical_cores
    from .provenance import cpu_name, utc_now

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return [
        f"cpu: {cpu_name()}",
        f"physical cores: {physical_cores()}, logical CPUs: {os.cpu_count()}",
        f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load)}",
        f"date: {utc_now()}",
    ]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python -m bench.packbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=choice("grid", GRIDS), default="scaled")
    p.add_argument("--repeats", type=number("repeats", int, minimum=0, strict=True), default=1)
    p.add_argument(
        "--baseline",
        type=choice("baseline", BASELINES),
        default="local",
        help="the one-at-a-time side: local, or one-per-gpu (--executor auto --runs-per-gpu 1)",
    )
    p.add_argument(
        "--all-threads",
        action="store_true",
        help="also one at a time with --threads-per-run = the physical cores (a different configuration)",
    )
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $BENCH_DATA_DIR or ./data)")
    p.add_argument("--out", default="results/packbench", help="where the table goes")
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    try:
        args = p.parse_args(own)
    except UsageError as e:
        print(f"bench.packbench: error: {e}", file=sys.stderr)
        return 2
    import pandas as pd

    from .packing import physical_cores

    grid = GRIDS[args.grid]
    flags_of = {"local": BASELINES[args.baseline], "packed": MODES["packed"]}
    if args.all_threads:
        flags_of["all-threads"] = ["--executor", "local", "--threads-per-run", str(physical_cores())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = _machine()
    print("\n".join(before), flush=True)
    rows, same = [], []
    with tempfile.TemporaryDirectory(prefix="packbench-") as tmp:
        for r in range(args.repeats):
            order = list(flags_of) if r % 2 == 0 else list(flags_of)[::-1]
            tables = {}
            for mode in order:
                work = Path(tmp) / f"r{r}"
                tables[mode], measured = _sweep(mode, flags_of[mode], grid, extra, args.data_dir, work)
                row = {"repeat": r, "first": order[0], **measured}
                rows.append(row)
                print(
                    f"repeat {r} {mode:>6}: {row['wall_s']:7.1f} s wall, CPU {row['cpu_user_s']:.0f} s user "
                    f"+ {row['cpu_sys_s']:.0f} s sys, {row['ok']}/{row['runs']} ok, packing {row['packing']}",
                    flush=True,
                )
            same.append(identical(tables["local"], tables["packed"]))
    df = pd.DataFrame(rows)
    wide = df.pivot(index="repeat", columns="mode", values="wall_s")
    wide["ratio_local_over_packed"] = wide["local"] / wide["packed"]
    if args.all_threads:
        wide["ratio_all_threads_over_packed"] = wide["all-threads"] / wide["packed"]
    after = _machine()
    command = "python -m bench.packbench " + shlex.join(argv)
    df.to_csv(out / "packbench.csv", index=False)
    ratio = float(wide["ratio_local_over_packed"].median())
    lines = [
        f"# Packed vs one-at-a-time sweep ({args.grid} grid)",
        "",
        f"`{command}`",
        "",
        f"| repeat | one at a time ({args.baseline}) wall s | packed wall s | ratio |",
        "| --- | --- | --- | --- |",
        *(
            f"| {r} | {w['local']:.1f} | {w['packed']:.1f} | {w['ratio_local_over_packed']:.2f} |"
            for r, w in wide.iterrows()
        ),
        "",
        f"Median ratio over {len(wide)} repeat(s): **{ratio:.2f}x** (one at a time / packed; > 1: packing is "
        "faster).",
        "",
        "Same configurations on both sides (threads per run: "
        + ", ".join(
            f"{m} {t}" for m, t in df.groupby("mode")["threads"].first().items() if m != "all-threads"
        )
        + "): run_ids and metric columns identical between one at a time and packed in "
        f"{sum(same)} of {len(same)} repeat(s).",
        "",
        *(
            [
                f"With every thread (`--executor local --threads-per-run {physical_cores()}`, a different "
                "configuration: other run_ids, other metrics in the last digits): median wall time "
                f"{wide['all-threads'].median():.1f} s, "
                f"{wide['ratio_all_threads_over_packed'].median():.2f}x the packed sweep's.",
                "",
            ]
            if args.all_threads
            else []
        ),
        "| mode | packing | CPU user s | CPU sys s | median run training samples/s | sum of run training s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {m} | {g['packing'].iloc[0]} | {g['cpu_user_s'].median():.0f} | "
            f"{g['cpu_sys_s'].median():.0f} | {g['run_train_samples_per_s_median'].median():.0f} | "
            f"{g['sum_train_s'].median():.0f} |"
            for m, g in df.groupby("mode")
        ),
        "",
        "Before: " + "; ".join(before),
        "",
        "After: " + "; ".join(after),
        "",
    ]
    (out / "packbench.md").write_text("\n".join(lines))
    (out / "command.txt").write_text("\n".join([command, *before, "after:", *after[2:3], ""]))
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
