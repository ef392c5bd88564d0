"""Micro-benchmarks of one train step and one eval forward per method (``nox -s perf``).

Usage::

    python -m bench.perf [--quick] [--methods M ...] [--hidden H ...] [--batch B ...]
                         [--device cpu cuda] [--rounds R] [--warmup W] [--max-seconds S]
                         [--out results/perf] [--dry-run]

The grid is every available method x hidden {64, 128, 256, 512} x batch {64, 256} x
device (cpu, and cuda when available) at the notebook's shape: 28 steps of 28 features,
10 classes, 2 layers, bidirectional, ``penalty_param`` 0.5 for the penalty methods.
The data is synthetic (:func:`shape28_task`); only the shapes matter for timing.

This module writes the plan (``plan.json``), runs pytest on ``benchmarks/`` (the
pytest-benchmark tests in ``benchmarks/test_steps.py`` read the plan through the
environment variable ``CDBENCH_PERF_PLAN``), then turns pytest-benchmark's JSON into
``table.csv``, ``table.md``, ``relative_throughput.png``, ``scaling.png`` and
``command.txt`` in ``--out``.

Timing rules (see ``benchmarks/test_steps.py``): ``benchmark.pedantic`` with
``iterations=1``; warm-up rounds are run and discarded; the timed function is the step
followed by a device synchronisation (``torch.cuda.synchronize()`` on CUDA, nothing on
CPU), and the pedantic ``setup`` synchronises too, so each round's clock starts on an
idle device and stops after the device finished.

Rounds: ``--warmup`` (default 3 on CPU, 10 on CUDA) warm-up and ``--rounds`` (default
5 on CPU, 30 on CUDA) timed rounds per benchmark.  A benchmark whose estimated cost
(:func:`estimate_step_s`) would exceed ``--max-seconds`` (default 30) is cut to one
warm-up round and as many timed rounds as fit (at least one); ``table.csv`` lists the
rounds each row was measured with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import measure
from .methods import METHODS
from .runner import RunConfig
from .tasks import Task

HIDDEN = (64, 128, 256, 512)
BATCH = (64, 256)
QUICK_HIDDEN = (64, 128)
QUICK_BATCH = (64,)
KINDS = ("train", "eval")
SEQ_LEN = 28
INPUT_SIZE = 28
CLASSES = 10
NUM_LAYERS = 2
BIDIRECTIONAL = True
PENALTY = 0.5
#: default (warm-up, timed) rounds per device type
DEFAULT_ROUNDS = {"cpu": (3, 5), "cuda": (10, 30)}
DEFAULT_MAX_SECONDS = 30.0
PLAN_ENV = "CDBENCH_PERF_PLAN"
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

# Extra arithmetic per recurrent weight (n = 4H rows, p = H columns) on top of the LSTM,
# in flops, as (coefficient, "np2" | "n3") for (train, eval); rough fits, only used for
# the time estimate and for cutting rounds of slow benchmarks.
_EXTRA = {
    "lstm": ((0, "np2"), (0, "np2")),
    "cd": ((10, "np2"), (0, "np2")),  # eval: A(W) cached across no-grad forwards
    "cdopt": ((24, "np2"), (8, "np2")),
    "cayley": ((20, "np2"), (0, "np2")),
    "geotorch_expm": ((100, "n3"), (12, "n3")),
    "geotorch_cayley": ((20, "n3"), (9, "n3")),
}
#: fixed per-step cost in seconds (kernel launches and Python over 28 steps x 4 cells)
_FIXED_S = {"train": 0.02, "eval": 0.005}
#: flops of building the model, coefficient of n^3 per recurrent weight (geotorch completes
#: each n x p weight to an n x n orthogonal matrix with QR); others: negligible
_BUILD_N3 = {"geotorch_expm": 15, "geotorch_cayley": 15}


def shape28_task(n: int) -> Task:
    """A synthetic task of the notebook's shape: ``n`` random sequences of 28 steps x 28
    features in [0, 1] with random labels 0..9 (timing only; the values do not matter).

    Parameters
    ----------
    n : int
        Number of training sequences (at least the batch size, so that the first batch
        of :func:`bench.runner.make_steps` is full).

    Returns
    -------
    Task
    """
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(n, SEQ_LEN, INPUT_SIZE, generator=g), torch.randint(CLASSES, (n,), generator=g))
    test = (torch.rand(8, SEQ_LEN, INPUT_SIZE, generator=g), torch.randint(CLASSES, (8,), generator=g))
    return Task(name="shape28", input_size=INPUT_SIZE, output_size=CLASSES, metric="acc", train=train, test=test)


def run_config(method: str, hidden: int, batch: int, device: str) -> RunConfig:
    """The :class:`~bench.runner.RunConfig` of one benchmark (the notebook's model)."""
    return RunConfig(method=method, task="shape28", num_layers=NUM_LAYERS, hidden_size=hidden,
                     bidirectional=BIDIRECTIONAL, batch_size=batch, device=device,
                     penalty_param=PENALTY if METHODS[method].uses_penalty else None)


def step_flops(method: str, hidden: int, batch: int, kind: str) -> float:
    """Rough flop count of one step (LSTM matmuls plus the method's own arithmetic).

    Parameters
    ----------
    method : str
    hidden, batch : int
    kind : {"train", "eval"}

    Returns
    -------
    float
        Forward LSTM flops ``sum_layers dirs * T * B * 8H (in + H)``, tripled for a train
        step, plus ``coef * n p^2`` or ``coef * n^3`` per recurrent weight (``_EXTRA``).
    """
    dirs = 2 if BIDIRECTIONAL else 1
    fwd = sum(dirs * SEQ_LEN * batch * 8 * hidden * ((INPUT_SIZE if layer == 0 else dirs * hidden) + hidden)
              for layer in range(NUM_LAYERS))
    coef, kind_of = _EXTRA.get(method, ((0, "np2"), (0, "np2")))[KINDS.index(kind)]
    n, p = 4 * hidden, hidden
    extra = coef * (n * p * p if kind_of == "np2" else n ** 3) * NUM_LAYERS * dirs
    return fwd * (3 if kind == "train" else 1) + extra


def estimate_step_s(method: str, hidden: int, batch: int, kind: str, gflops: float) -> float:
    """Estimated seconds of one step at a sustained rate of ``gflops`` GFLOP/s."""
    return _FIXED_S[kind] + step_flops(method, hidden, batch, kind) / (gflops * 1e9)


def estimate_build_s(method: str, hidden: int, gflops: float) -> float:
    """Estimated seconds of building the model of ``method`` (before any step)."""
    weights = NUM_LAYERS * (2 if BIDIRECTIONAL else 1)
    return 0.05 + _BUILD_N3.get(method, 0) * (4 * hidden) ** 3 * weights / (gflops * 1e9)


def calibrate_gflops(device: str) -> float:
    """Sustained matmul rate of ``device`` in GFLOP/s (best of 3 products of 1024 x 1024
    on CPU, 4096 x 4096 on CUDA); about 0.1 s."""
    n = 4096 if torch.device(device).type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    sync = measure.synchronizer(device)
    a @ a
    best = math.inf
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        a @ a
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def rounds_for(est_s: float, warmup: int, rounds: int, max_seconds: float | None) -> tuple[int, int]:
    """(warm-up, timed) rounds of one benchmark: the defaults, or, when
    ``(warmup + rounds) * est_s > max_seconds``, one warm-up round and as many timed rounds
    as fit in ``max_seconds`` (at least one)."""
    if max_seconds is None or (warmup + rounds) * est_s <= max_seconds:
        return warmup, rounds
    return min(warmup, 1), max(1, min(rounds, int(max_seconds // est_s) - 1))


def make_plan(methods, hidden, batch, devices, *, warmup=None, rounds=None, max_seconds=DEFAULT_MAX_SECONDS,
              gflops=None) -> list[dict]:
    """Every benchmark of the grid, with its rounds and estimated seconds.

    Parameters
    ----------
    methods, hidden, batch, devices : sequences
        The grid.
    warmup, rounds : int, optional
        Warm-up and timed rounds; None: ``DEFAULT_ROUNDS`` of the device type.
    max_seconds : float or None
        Per-benchmark time budget (see :func:`rounds_for`); None: never cut rounds.
    gflops : dict, optional
        ``{device: GFLOP/s}`` for the estimate; missing devices use 50 (CPU) or 20000.

    Returns
    -------
    list of dict
        Keys method, device, hidden, batch, kind, warmup, rounds, cut (True when the
        budget reduced the rounds), est_step_s, est_s (build plus all rounds).
    """
    gflops = gflops or {}
    plan = []
    for device in devices:
        dw, dr = DEFAULT_ROUNDS[torch.device(device).type]
        rate = gflops.get(device) or (50.0 if torch.device(device).type == "cpu" else 20000.0)
        for h in hidden:
            for b in batch:
                for m in methods:
                    for kind in KINDS:
                        est = estimate_step_s(m, h, b, kind, rate)
                        if m != "lstm":  # every round also times one lstm step (paired_vs_lstm)
                            est += estimate_step_s("lstm", h, b, kind, rate)
                        w0, r0 = dw if warmup is None else warmup, dr if rounds is None else rounds
                        w, r = rounds_for(est, w0, r0, max_seconds)
                        plan.append({"method": m, "device": device, "hidden": h, "batch": b, "kind": kind,
                                     "warmup": w, "rounds": r, "cut": (w, r) != (w0, r0), "est_step_s": est,
                                     "est_s": estimate_build_s(m, h, rate) + (w + r) * est})
    return plan


def case_id(case: dict) -> str:
    """pytest id of a benchmark, e.g. ``cd-cpu-H64-B256``."""
    return f"{case['method']}-{case['device']}-H{case['hidden']}-B{case['batch']}"


def load_plan(kind: str) -> list[dict]:
    """The benchmarks of ``kind`` that ``benchmarks/test_steps.py`` runs: those of the plan
    file named by ``$CDBENCH_PERF_PLAN``, else the full default grid."""
    path = os.environ.get(PLAN_ENV)
    if path:
        plan = json.loads(Path(path).read_text())
    else:
        plan = make_plan(available_methods(), HIDDEN, BATCH, default_devices())
    return [c for c in plan if c["kind"] == kind]


def available_methods() -> list[str]:
    return [m for m, spec in METHODS.items() if spec.available()]


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def timed_step(fn, device: str):
    """``fn`` followed by a synchronisation of ``device``, so that a clock read right
    after it sees the device's work finished (``torch.cuda.synchronize`` on CUDA)."""
    sync = measure.synchronizer(device)

    def step():
        fn()
        sync()

    return step


# ---------------------------------------------------------------------------------------
# Results: pytest-benchmark JSON -> table, plots


def load_results(json_path):
    """One row per benchmark of a pytest-benchmark JSON file written by ``benchmarks/``.

    Columns: method, device, hidden, batch, kind, warmup, rounds, median_ms, samples_per_s,
    ratio_to_lstm, paired_vs_lstm.  ``ratio_to_lstm`` is the median step time divided by
    lstm's median of the same device, hidden, batch and kind in the same file (1.0 for
    lstm; 2.0: twice as slow); NaN when lstm was not run.  ``paired_vs_lstm`` is a
    throughput ratio (> 1: faster than lstm): the median over rounds of t_lstm / t_method,
    where t_lstm is the lstm step timed right before each round of the method
    (``extra_info["lstm_round_s"]``), so that drifts of the machine's speed between
    benchmarks cancel; 1.0 for lstm, NaN without those timings.
    """
    import pandas as pd

    data = json.loads(Path(json_path).read_text())
    rows = []
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "method" not in info:
            continue
        median = bm["stats"]["median"]
        lstm_s, method_s = info.get("lstm_round_s"), bm["stats"].get("data")
        paired = (1.0 if info["method"] == "lstm" else
                  ratio_stats(lstm_s, method_s)["ratio"] if lstm_s and method_s and len(lstm_s) == len(method_s)
                  else math.nan)
        rows.append({"method": info["method"], "device": info["device"], "hidden": int(info["hidden"]),
                     "batch": int(info["batch"]), "kind": info["kind"], "warmup": int(info["warmup"]),
                     "rounds": int(bm["stats"]["rounds"]), "median_ms": 1e3 * median,
                     "samples_per_s": info["samples"] / median, "paired_vs_lstm": paired})
    cols = ["method", "device", "hidden", "batch", "kind", "warmup", "rounds", "median_ms", "samples_per_s",
            "paired_vs_lstm"]
    df = pd.DataFrame(rows, columns=cols)
    key = ["device", "hidden", "batch", "kind"]
    ref = df[df["method"] == "lstm"].set_index(key)["median_ms"].rename("_lstm_ms")
    df = df.join(ref, on=key)
    df["ratio_to_lstm"] = df["median_ms"] / df["_lstm_ms"]
    df = df[[c for c in df.columns if c != "paired_vs_lstm"] + ["paired_vs_lstm"]]
    order = {m: i for i, m in enumerate(METHODS)}
    df = df.drop(columns="_lstm_ms").sort_values(
        ["device", "kind", "hidden", "batch", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
        ascending=[True, False, True, True, True])
    return df.reset_index(drop=True)


def write_tables(df, out: Path) -> None:
    """``table.csv`` (full precision) and ``table.md`` (rounded) in ``out``."""
    df.to_csv(out / "table.csv", index=False)
    ratio = lambda v: "-" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    md = df.assign(median_ms=df["median_ms"].map("{:.2f}".format),
                   samples_per_s=df["samples_per_s"].map("{:.0f}".format),
                   ratio_to_lstm=df["ratio_to_lstm"].map(ratio), paired_vs_lstm=df["paired_vs_lstm"].map(ratio))
    (out / "table.md").write_text(md.to_markdown(index=False) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(method: str) -> str:
    """The same colour for a method on every plot."""
    return f"C{list(METHODS).index(method) % 10}"


def _methods_in(df) -> list[str]:
    return [m for m in METHODS if m in set(df["method"])]


def plot_relative(df, path: Path) -> None:
    """Bars of each method's throughput relative to lstm per (hidden, batch), lstm being
    the line at 1; one panel per device and kind.  The bar is ``paired_vs_lstm`` (paired
    within rounds) where measured, else lstm's median time / the method's."""
    import numpy as np

    plt = _pyplot()
    panels = sorted({(d, k) for d, k in zip(df["device"], df["kind"])}, key=lambda p: (p[0], KINDS.index(p[1])))
    methods = [m for m in _methods_in(df) if m != "lstm"]  # lstm is the line at 1
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.2 * df[["hidden", "batch"]].drop_duplicates().shape[0]
                                                             + 3), 3.2 * len(panels)), squeeze=False)
    for ax, (device, kind) in zip(axes[:, 0], panels):
        sub = df[(df["device"] == device) & (df["kind"] == kind)]
        combos = sorted({(h, b) for h, b in zip(sub["hidden"], sub["batch"])})
        x = np.arange(len(combos))
        width = 0.8 / max(1, len(methods))
        top = 1.0
        idx = sub.set_index(["method", "hidden", "batch"])
        rel_of = (1.0 / idx["ratio_to_lstm"]).where(idx["paired_vs_lstm"].isna(), idx["paired_vs_lstm"])
        for i, m in enumerate(methods):
            rel = [rel_of.get((m, h, b), np.nan) for h, b in combos]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, rel, width, label=m, color=_color(m))
            top = max([top, *[v for v in rel if v == v]])
        ax.axhline(1.0, color="k", lw=0.8, label="lstm")
        ax.set_xticks(x, [f"H{h}\nB{b}" for h, b in combos])
        ax.set_ylim(0, 1.15 * top)
        ax.set_ylabel("samples/s relative to lstm")
        ax.set_title(f"{kind} step, {device}", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="upper center", frameon=False)
    fig.suptitle("median over rounds of t_lstm / t_method, each round paired with an lstm step",
                 fontsize=9, y=0.955)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(df, path: Path) -> None:
    """Train-step samples/s against hidden size per method, log-log; one panel per device
    and batch size.  lstm's line is its measured samples/s; another method's is lstm's
    samples/s times its ``paired_vs_lstm`` where measured (so a drift of the machine's
    speed between benchmarks does not show as a method outrunning lstm), else its own
    measured samples/s."""
    from matplotlib.ticker import NullLocator

    plt = _pyplot()
    train = df[df["kind"] == "train"].copy()
    key = ["device", "hidden", "batch"]
    ref = train[train["method"] == "lstm"].set_index(key)["samples_per_s"].rename("_lstm_sps")
    train = train.join(ref, on=key)
    paired = train["_lstm_sps"] * train["paired_vs_lstm"]
    train["samples_per_s"] = paired.where(paired.notna(), train["samples_per_s"])
    panels = sorted({(d, b) for d, b in zip(train["device"], train["batch"])})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (device, batch) in zip(axes[0], panels):
        sub = train[(train["device"] == device) & (train["batch"] == batch)]
        for m in _methods_in(sub):
            g = sub[sub["method"] == m].sort_values("hidden")
            ax.plot(g["hidden"], g["samples_per_s"], "o-", label=m, color=_color(m))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        hs = sorted(set(sub["hidden"]))
        ax.set_xticks(hs, [str(h) for h in hs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("hidden size H")
        ax.set_ylabel("train samples/s")
        ax.set_title(f"train step, {device}, batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment_lines(devices) -> list[str]:
    """torch version, device names, CPU count, torch threads, date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"torch: {torch.__version__}", f"python: {platform.python_version()}", f"cpu: {cpu}",
             f"cpu count: {measure.cpu_count()}", f"torch threads: {torch.get_num_threads()}"]
    if "cuda" in devices and torch.cuda.is_available():
        lines.append(f"cuda device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    lines.append(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    return lines


# ---------------------------------------------------------------------------------------
# CLI


def paired_times(methods, hidden: int, batch: int, device: str, rounds: int = 40, warmup: int = 3,
                 kind: str = "train", seed: int = 0) -> dict[str, list[float]]:
    """Interleaved step times: ``{method: [seconds per round]}``, round i of every method paired.

    Every round times one step (``kind``: ``"train"`` or ``"eval"``) of each method, in
    a random order, each between two device synchronisations.  Pairing within a round
    cancels slow drifts of the machine's speed (frequency changes, other tenants), which
    on a shared CPU are larger than the few per cent being measured.  Warm-up steps of
    every method run first and are not timed.
    """
    import random

    from .runner import make_steps

    task = shape28_task(max(batch, 64))
    sync = measure.synchronizer(device)
    fns = {m: getattr(make_steps(run_config(m, hidden, batch, device), task), kind) for m in methods}
    for m in methods:
        for _ in range(warmup):
            fns[m]()
    times = {m: [] for m in methods}
    order, rng = list(methods), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for m in order:
            t = measure.time_fn(fns[m], warmup=0, iters=1, sync=sync, clock=time.perf_counter)
            times[m].append(t.seconds_per_iter)
    return times


def ratio_stats(base: list[float], other: list[float]) -> dict:
    """Throughput of ``other`` relative to ``base`` from paired times (> 1: ``other`` is faster).

    Returns ``ratio`` (median over rounds of t_base / t_other), ``q1``, ``q3`` (its
    quartiles) and ``of_medians`` (median t_base / median t_other).
    """
    import statistics

    r = sorted(a / b for a, b in zip(base, other))
    q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], r[0], r[0])
    return dict(ratio=statistics.median(r), q1=q1, q3=q3,
                of_medians=statistics.median(base) / statistics.median(other))


def paired_ratios(methods, hidden: int, batch: int, device: str, rounds: int = 40, warmup: int = 3,
                  kind: str = "train", seed: int = 0, times: dict | None = None) -> list[dict]:
    """Throughput relative to ``lstm`` from :func:`paired_times` (measured unless ``times`` is given).

    Returns
    -------
    list of dict
        One row per method: method, device, hidden, batch, kind, rounds, median_ms,
        vs_lstm (median over rounds of t_lstm / t_method; > 1 is faster), vs_lstm_q1,
        vs_lstm_q3, vs_lstm_of_medians (median t_lstm / median t_method).
    """
    import statistics

    if "lstm" not in methods:
        methods = ["lstm", *methods]
    if times is None:
        times = paired_times(methods, hidden, batch, device, rounds, warmup, kind, seed)
    rows = []
    for m in methods:
        st = ratio_stats(times["lstm"], times[m])
        rows.append(dict(method=m, device=device, hidden=hidden, batch=batch, kind=kind, rounds=len(times[m]),
                         median_ms=1e3 * statistics.median(times[m]), vs_lstm=st["ratio"],
                         vs_lstm_q1=st["q1"], vs_lstm_q3=st["q3"], vs_lstm_of_medians=st["of_medians"]))
    return rows


def pairwise_rows(times: dict[str, list[float]], **key) -> list[dict]:
    """Every ordered pair (method, baseline) of paired times: throughput of method relative to baseline."""
    rows = []
    for m in times:
        for b in times:
            if m != b:
                st = ratio_stats(times[b], times[m])
                rows.append(dict(**key, method=m, baseline=b, ratio=st["ratio"], q1=st["q1"], q3=st["q3"],
                                 of_medians=st["of_medians"]))
    return rows


def run_paired(args, argv, methods, hidden, batch, devices, rounds: int, warmup: int) -> int:
    """``--paired``: interleaved ratios for every hidden x batch x device x kind (``methods``
    starting with lstm); writes paired.csv (against lstm), pairs.csv (every method against
    every other), paired.md (both tables) and paired_command.txt in ``--out``."""
    import pandas as pd

    rows, pairs = [], []
    for device in devices:
        for h in hidden:
            for b in batch:
                for kind in KINDS:
                    times = paired_times(methods, h, b, device, rounds=rounds, warmup=warmup, kind=kind)
                    new = paired_ratios(methods, h, b, device, kind=kind, times=times)
                    rows += new
                    pairs += pairwise_rows(times, device=device, hidden=h, batch=b, kind=kind)
                    print(f"bench.perf --paired: {device} H{h} B{b} {kind}: " + ", ".join(
                        f"{r['method']} {r['vs_lstm']:.3f}" for r in new), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df, dp = pd.DataFrame(rows), pd.DataFrame(pairs)
    df.to_csv(out / "paired.csv", index=False)
    dp.to_csv(out / "pairs.csv", index=False)
    (out / "paired.md").write_text(
        "Throughput relative to lstm (> 1 is faster): median over rounds of t_lstm / t_method, its quartiles,\n"
        "and median t_lstm / median t_method.\n\n" + df.to_markdown(index=False, floatfmt=".3f")
        + "\n\nEvery pair: throughput of method relative to baseline, the same statistics.\n\n"
        + dp.to_markdown(index=False, floatfmt=".3f") + "\n")
    lines = [shlex.join(["python", "-m", "bench.perf", *argv]), *environment_lines(devices)]
    (out / "paired_command.txt").write_text("\n".join(lines) + "\n")
    print(f"bench.perf: wrote {out}/paired.csv, pairs.csv, paired.md, paired_command.txt")
    return 0


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"need a positive integer, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the bad value, no usage block, exit 2 (as bench.ablate)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="methods (default: every available one)")
    p.add_argument("--hidden", nargs="+", type=_positive_int, default=None, help=f"hidden sizes (default {HIDDEN})")
    p.add_argument("--batch", nargs="+", type=_positive_int, default=None, help=f"batch sizes (default {BATCH})")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=None,
                   help="devices (default: cpu, and cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help=f"hidden {QUICK_HIDDEN}, batch {QUICK_BATCH} (--hidden/--batch still win)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timed rounds (default 5 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3 CPU, 10 CUDA)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="per-benchmark budget: slower benchmarks get 1 warm-up round and fewer timed "
                        "rounds (0: no budget)")
    p.add_argument("--out", default="results/perf", help="output folder (default results/perf)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate, run nothing")
    p.add_argument("--paired", action="store_true",
                   help="interleaved, paired timing of the methods against lstm (ratios robust to drifts of "
                        "the machine's speed) instead of pytest-benchmark; default 40 rounds")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.max_seconds < 0:
        p.error("--max-seconds must be >= 0")
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if not args.dry_run:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            ok = os.access(out, os.W_OK)
        except OSError:
            ok = False
        if not ok:
            p.error(f"--out {args.out}: cannot create or write to this folder")
    return args


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def print_plan(plan: list[dict], gflops: dict) -> None:
    total = sum(c["est_s"] for c in plan)
    rates = ", ".join(f"{d} ~{g:.0f} GFLOP/s" for d, g in gflops.items())
    print(f"bench.perf: {len(plan)} benchmarks ({rates}); rough estimate {_fmt_s(total)} (builds and rounds)")
    cut = [c for c in plan if c["cut"]]
    for c in sorted(plan, key=lambda c: -c["est_s"])[:8]:
        print(f"  {c['kind']:5s} {case_id(c):34s} ~{c['est_step_s']:.2f} s/step x "
              f"({c['warmup']} warm-up + {c['rounds']} rounds)")
    if cut:
        print(f"  {len(cut)} slow benchmark(s) run with fewer rounds (per-benchmark budget --max-seconds)")
    sys.stdout.flush()


def main(argv=None) -> int:
    """Run the micro-benchmarks and write the table, plots and command line; returns
    pytest's exit code (0 when every benchmark passed)."""
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    methods = args.methods or available_methods()
    missing = [m for m in methods if not METHODS[m].available()]
    if missing:
        print(f"bench.perf: skipping unavailable method(s) {', '.join(missing)}")
        methods = [m for m in methods if m not in missing]
    hidden = args.hidden or (QUICK_HIDDEN if args.quick else HIDDEN)
    batch = args.batch or (QUICK_BATCH if args.quick else BATCH)
    devices = args.device or default_devices()
    if args.paired:
        if "lstm" not in methods:
            methods = ["lstm", *methods]
        rounds, warmup = args.rounds or 40, 3 if args.warmup is None else args.warmup
        gflops = {d: calibrate_gflops(d) for d in devices}
        est = sum((rounds + warmup) * estimate_step_s(m, h, b, kind, gflops[d]) + estimate_build_s(m, h, gflops[d])
                  for d in devices for h in hidden for b in batch for kind in KINDS for m in methods)
        print(f"bench.perf --paired: {', '.join(methods)} x hidden {' '.join(map(str, hidden))} x batch "
              f"{' '.join(map(str, batch))} x {', '.join(devices)} x train, eval; {warmup} warm-up + {rounds} "
              f"rounds each; rough estimate {_fmt_s(est)}")
        if args.dry_run:
            return 0
        return run_paired(args, argv, methods, hidden, batch, devices, rounds, warmup)
    gflops = {d: calibrate_gflops(d) for d in devices}
    plan = make_plan(methods, hidden, batch, devices, warmup=args.warmup, rounds=args.rounds,
                     max_seconds=args.max_seconds or None, gflops=gflops)
    if not plan:
        print("bench.perf: nothing to run", file=sys.stderr)
        return 2
    print_plan(plan, gflops)
    if args.dry_run:
        return 0
    if not BENCH_DIR.is_dir():
        print(f"bench.perf: {BENCH_DIR} not found (run from a source checkout)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "benchmark.json"
    json_path.unlink(missing_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    os.environ[PLAN_ENV] = str((out / "plan.json").resolve())
    pytest_args = [str(BENCH_DIR), "-o", "addopts=", "-p", "no:cacheprovider", "-ra", "--benchmark-enable",
                   f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,min,max,rounds",
                   "--benchmark-sort=fullname"]
    import pytest

    t0 = time.perf_counter()
    code = int(pytest.main(pytest_args))
    wall = time.perf_counter() - t0
    if not json_path.is_file():
        print("bench.perf: pytest wrote no benchmark JSON; no table", file=sys.stderr)
        return code or 1
    df = load_results(json_path)
    write_tables(df, out)
    plot_relative(df, out / "relative_throughput.png")
    plot_scaling(df, out / "scaling.png")
    lines = [shlex.join(["python", "-m", "bench.perf", *argv]),
             "pytest " + shlex.join(pytest_args) + f"  ({PLAN_ENV}={os.environ[PLAN_ENV]})",
             *environment_lines(devices),
             "calibrated matmul rate: " + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in gflops.items()),
             f"estimated: {_fmt_s(sum(c['est_s'] for c in plan))}; pytest wall time: {_fmt_s(wall)}",
             f"pytest exit code: {code}"]
    (out / "command.txt").write_text("\n".join(lines) + "\n")
    print(f"bench.perf: wrote {out}/table.csv, table.md, relative_throughput.png, scaling.png, command.txt")
    return code


if __name__ == "__main__":
    sys.exit(main())
