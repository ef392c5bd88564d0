"""``bench.perf``'s outputs: pytest-benchmark's JSON to ``table.csv`` / ``table.md``,
``relative_throughput.png`` and ``scaling.png`` (column names and ratios: docs/perf.md).

Ratios are taken only between rows of the same file (the same run);
``paired_vs_unconstrained`` pairs each round of a method with the ``unconstrained`` step timed
right before it (:func:`bench.perf.paired.ratio_stats`) and is the figure to quote.  Files
written by 0.1.0, where the method ``unconstrained`` was called ``lstm``, are read as well: their
method names are mapped by :func:`bench.methods.canonical`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fsio import save_figure, write_atomic, write_csv
from ..methods import METHODS, canonical
from .paired import ratio_stats
from .plan import KINDS, REFERENCE

__all__ = ["load_results", "plot_relative", "plot_scaling", "write_tables"]


def load_results(json_path):
    """One row per benchmark of a pytest-benchmark JSON file written by ``benchmarks/``.

    Columns: method, device, hidden, batch, kind, warmup, rounds, median_ms, samples_per_s,
    ratio_to_unconstrained, paired_vs_unconstrained.  ``ratio_to_unconstrained`` is the median
    step time divided by the ``unconstrained`` method's median of the same device, hidden, batch
    and kind in the same file (1.0 for it; 2.0: twice as slow); NaN when it was not run.
    ``paired_vs_unconstrained`` is a throughput ratio (> 1: faster than unconstrained): the median
    over rounds of t_ref / t_method, where t_ref is the unconstrained step timed right before each
    round of the method (``extra_info["reference_round_s"]``; ``"lstm_round_s"`` in files written
    by 0.1.0), so that drifts of the machine's speed between benchmarks cancel; 1.0 for
    unconstrained, NaN without those timings.  ``kernel_ops``: the kernel-launching operators of one
    step (:func:`bench.measure.count_kernel_ops`; NaN in files written before it was counted).
    """
    import pandas as pd

    data = json.loads(Path(json_path).read_text())
    rows = []
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "method" not in info:
            continue
        median = bm["stats"]["median"]
        ref_s, method_s = info.get("reference_round_s", info.get("lstm_round_s")), bm["stats"].get("data")
        method = canonical(info["method"])
        paired = (
            1.0
            if method == REFERENCE
            else ratio_stats(ref_s, method_s)["ratio"]
            if ref_s and method_s and len(ref_s) == len(method_s)
            else math.nan
        )
        rows.append(
            {
                "method": method,
                "device": info["device"],
                "hidden": int(info["hidden"]),
                "batch": int(info["batch"]),
                "kind": info["kind"],
                "warmup": int(info["warmup"]),
                "rounds": int(bm["stats"]["rounds"]),
                "median_ms": 1e3 * median,
                "samples_per_s": info["samples"] / median,
                "paired_vs_unconstrained": paired,
                "kernel_ops": info.get("kernel_ops", math.nan),
            }
        )
    cols = [
        "method",
        "device",
        "hidden",
        "batch",
        "kind",
        "warmup",
        "rounds",
        "median_ms",
        "samples_per_s",
        "paired_vs_unconstrained",
        "kernel_ops",
    ]
    df = pd.DataFrame(rows, columns=cols)
    key = ["device", "hidden", "batch", "kind"]
    ref = df[df["method"] == REFERENCE].set_index(key)["median_ms"].rename("_ref_ms")
    df = df.join(ref, on=key)
    df["ratio_to_unconstrained"] = df["median_ms"] / df["_ref_ms"]
    last = ["paired_vs_unconstrained", "kernel_ops"]
    df = df[[c for c in df.columns if c not in last] + last]
    order = {m: i for i, m in enumerate(METHODS)}
    df = df.drop(columns="_ref_ms").sort_values(
        ["device", "kind", "hidden", "batch", "method"],
        key=lambda s: s.map(order) if s.name == "method" else s,
        ascending=[True, False, True, True, True],
    )
    return df.reset_index(drop=True)


def write_tables(df, out: Path) -> None:
    """``table.csv`` (full precision) and ``table.md`` (rounded) in ``out``."""
    write_csv(df, out / "table.csv")
    ratio = lambda v: "-" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    md = df.assign(
        median_ms=df["median_ms"].map("{:.2f}".format),
        samples_per_s=df["samples_per_s"].map("{:.0f}".format),
        ratio_to_unconstrained=df["ratio_to_unconstrained"].map(ratio),
        paired_vs_unconstrained=df["paired_vs_unconstrained"].map(ratio),
        kernel_ops=df["kernel_ops"].map(lambda v: "-" if v != v else f"{v:.0f}"),
    )
    write_atomic(out / "table.md", md.to_markdown(index=False) + "\n")


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
    """Bars of each method's throughput relative to unconstrained per (hidden, batch), unconstrained
    being the line at 1; one panel per device and kind.  The bar is ``paired_vs_unconstrained``
    (paired within rounds) where measured, else unconstrained's median time / the method's."""
    import numpy as np

    plt = _pyplot()
    panels = sorted(
        {(d, k) for d, k in zip(df["device"], df["kind"])}, key=lambda p: (p[0], KINDS.index(p[1]))
    )
    methods = [m for m in _methods_in(df) if m != REFERENCE]  # the reference is the line at 1
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(6, 1.2 * df[["hidden", "batch"]].drop_duplicates().shape[0] + 3), 3.2 * len(panels)),
        squeeze=False,
    )
    for ax, (device, kind) in zip(axes[:, 0], panels):
        sub = df[(df["device"] == device) & (df["kind"] == kind)]
        combos = sorted({(h, b) for h, b in zip(sub["hidden"], sub["batch"])})
        x = np.arange(len(combos))
        width = 0.8 / max(1, len(methods))
        top = 1.0
        idx = sub.set_index(["method", "hidden", "batch"])
        paired = idx["paired_vs_unconstrained"]
        rel_of = (1.0 / idx["ratio_to_unconstrained"]).where(paired.isna(), paired)
        for i, m in enumerate(methods):
            rel = [rel_of.get((m, h, b), np.nan) for h, b in combos]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, rel, width, label=m, color=_color(m))
            top = max([top, *[v for v in rel if v == v]])
        ax.axhline(1.0, color="k", lw=0.8, label=REFERENCE)
        ax.set_xticks(x, [f"H{h}\nB{b}" for h, b in combos])
        ax.set_ylim(0, 1.15 * top)
        ax.set_ylabel(f"samples/s relative to {REFERENCE}")
        ax.set_title(f"{kind} step, {device}", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="upper center", frameon=False)
    fig.suptitle(
        f"median over rounds of t_{REFERENCE} / t_method, each round paired with an {REFERENCE} step",
        fontsize=9,
        y=0.955,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_scaling(df, path: Path) -> None:
    """Train-step samples/s against hidden size per method, log-log; one panel per device
    and batch size.  unconstrained's line is its measured samples/s; another method's is
    unconstrained's samples/s times its ``paired_vs_unconstrained`` where measured (so a drift of
    the machine's speed between benchmarks does not show as a method outrunning it), else its own
    measured samples/s."""
    from matplotlib.ticker import NullLocator

    plt = _pyplot()
    train = df[df["kind"] == "train"].copy()
    key = ["device", "hidden", "batch"]
    ref = train[train["method"] == REFERENCE].set_index(key)["samples_per_s"].rename("_ref_sps")
    train = train.join(ref, on=key)
    paired = train["_ref_sps"] * train["paired_vs_unconstrained"]
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
    save_figure(fig, path, dpi=120)
    plt.close(fig)
