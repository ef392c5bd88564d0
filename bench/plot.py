"""Plots, stats.csv and summary.md from a sweep's CSV files alone.

Usage: ``python -m bench.plot <folder>`` redraws everything in ``<folder>`` from its
runs.csv and history.csv.  Every interval drawn or printed comes from ``stats.csv``
(:func:`bench.stats.all_stats`): mean over the ok runs of a configuration with its 95%
Student-t interval, paired differences to the baselines, throughput ratios.  Runs that
diverged or failed are drawn as such (red crosses) and listed in summary.md, never
silently dropped.  Folders written before step-level history, validation split and
whole-run throughput existed still draw: what their CSVs cannot give is left out.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import stats  # noqa: E402
from .errors import UsageError  # noqa: E402
from .fsio import check_folder, save_figure, write_atomic, write_csv  # noqa: E402
from .provenance import read_meta  # noqa: E402

METRIC_LABEL = {"acc": "test accuracy (%)", "ce": "test cross-entropy", "mse": "test MSE"}
QUANTITY_LABEL = {
    "test_metric": "final",
    "test_metric_projected": "after projection",
    "test_metric_at_best_val": "at best validation step",
    "feasibility_raw": "feasibility raw",
    "feasibility_eff": "feasibility eff",
    "train_samples_per_s": "train samples/s",
    "step_vs_baseline": "step vs baseline",
}
#: Configuration columns never drawn as a swept axis or used in labels.
NOT_AN_AXIS = ("method", "seed", "penalty_param", *stats.BOOKKEEPING)
NEVER = "never"


def _save(fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    plt.close(fig)


def _read_complete(path: Path) -> pd.DataFrame:
    """The complete rows of a result CSV: a torn last line (a sweep killed inside a write, or one
    still writing) is dropped, as the store does (``bench.store.read_rows``), instead of being read
    as a run with truncated values."""
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return pd.read_csv(io.StringIO(text)) if text.strip() else pd.DataFrame()


def _read(folder: Path):
    runs = _read_complete(folder / "runs.csv")
    hist = _read_complete(folder / "history.csv")
    for name, df in (("runs.csv", runs), ("history.csv", hist)):
        if len(df.columns) and "run_id" not in df:
            raise UsageError(f"{folder / name}: no run_id column: not a result file of bench.ablate")
    if not hist.empty:
        # rows written before step-level logging are epoch rows: the whole file (no kind column)
        # or, in a folder resumed since, the rows whose kind is empty
        hist["kind"] = hist["kind"].fillna("epoch") if "kind" in hist else "epoch"
    return runs, hist


def _scale(metric) -> float:
    return 100.0 if metric == "acc" else 1.0


def _metric_of(df: pd.DataFrame) -> str:
    return df["metric"].dropna().iloc[0] if "metric" in df and df["metric"].notna().any() else "acc"


def _color(name: str, names) -> str:
    """The same colour for ``name`` wherever the same set of ``names`` is drawn."""
    names = sorted(set(names))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return cmap(names.index(name) % cmap.N)


def _varying(runs: pd.DataFrame) -> list[str]:
    """Configuration columns (seed and bookkeeping aside) that take more than one value."""
    return [c for c in stats.config_columns(runs, without=NOT_AN_AXIS) if runs[c].map(str).nunique() > 1]


def _label(row, cols) -> str:
    """``method penalty_param=0.5 lr=0.001``: the method and the given configuration columns."""
    parts = [str(row["method"])]
    if "penalty_param" in row and pd.notna(row["penalty_param"]):
        parts.append(f"penalty_param={row['penalty_param']:g}")
    for c in cols:
        if c in row and pd.notna(row[c]):
            v = row[c]
            parts.append(f"{c}={v:g}" if isinstance(v, float) else f"{c}={v}")
    return " ".join(parts)


def _estimates(st: pd.DataFrame, kind: str, quantity: str, baseline=None) -> pd.DataFrame:
    if st.empty:
        return st
    sel = (st["kind"] == kind) & (st["quantity"] == quantity)
    if baseline is not None:
        sel &= st["baseline"] == baseline
    return st[sel]


def _same(est: pd.DataFrame, keys: list[str], key: str) -> pd.DataFrame:
    """The rows of ``est`` whose configuration columns ``keys`` spell ``key`` (stats.config_id)."""
    return est[stats.config_id(est, keys) == key] if len(est) else est


def _positions(values: pd.Series, cats: list[str] | None) -> pd.Series:
    """x positions: the values themselves on a numeric axis, their index in ``cats`` otherwise."""
    if cats is None:
        return values
    return values.map(lambda v: cats.index(str(v)) if pd.notna(v) else np.nan)


def _yerr(est: pd.DataFrame, scale: float) -> np.ndarray:
    """Asymmetric error bars from the interval; 0 where no interval exists (n = 1)."""
    lo = (est["mean"] - est["ci_low"]).fillna(0).to_numpy()
    hi = (est["ci_high"] - est["mean"]).fillna(0).to_numpy()
    return scale * np.vstack([lo, hi])


def _n_note(est: pd.DataFrame) -> str:
    if (est["n"] < 2).all():
        return " (n = 1: no interval)"
    return " (some n = 1: no interval)" if (est["n"] < 2).any() else ""


def _mark_not_ok(ax, bad: pd.DataFrame, xcol: str | None) -> None:
    """Red crosses at the bottom of ``ax`` for runs that did not finish ok, at their ``xcol``
    value where they have one, and a line naming them."""
    if bad.empty:
        return
    ylo = ax.get_ylim()[0]
    placed = bad[bad[xcol].notna()] if xcol else bad.iloc[:0]
    if len(placed):
        ax.scatter(placed[xcol], [ylo] * len(placed), marker="x", color="red", zorder=5, clip_on=False)
    names = ", ".join(f"{r['method']} seed {r['seed']} {r['status']}" for _, r in bad.iterrows())
    ax.plot([], [], "x", color="red", label=f"not ok: {names}"[:120])


# ---------------------------------------------------------------------------------------------
# metric against penalty_param


def set_penalty_axis(ax, penalties) -> None:
    """Log x axis for penalty_param; symmetric-log when 0 is among the values, so that
    penalty_param 0 is drawn (linear within the smallest positive value, log beyond)."""
    p = np.asarray(sorted({float(v) for v in penalties if pd.notna(v)}))
    if len(p) == 0:
        return
    if (p > 0).all():
        ax.set_xscale("log")
        return
    pos = p[p > 0]
    thresh = float(pos.min()) if len(pos) else 1.0
    ax.set_xscale("symlog", linthresh=thresh)
    ax.set_xlim(-0.5 * thresh, (pos.max() if len(pos) else thresh) * 2)


def plot_metric_vs_penalty(runs: pd.DataFrame, st: pd.DataFrame, folder: Path) -> list[str]:
    """Test metric against penalty_param per shared configuration: penalty methods as points with
    95% CI error bars (projected weights dotted), the other methods as horizontal lines with their
    CI as a band.  Drawn for configurations where penalty_param takes >= 2 values (or the only one)."""
    if "penalty_param" not in runs or runs["penalty_param"].isna().all() or st.empty:
        return []
    keys = stats.config_columns(runs, without=("method", "seed", "penalty_param", *stats.BOOKKEEPING))
    groups = list(runs.groupby(keys, dropna=False, sort=False)) if keys else [((), runs)]
    groups = [(k, g) for k, g in groups if len(groups) == 1 or g["penalty_param"].nunique() > 1]
    label_cols = [c for c in _varying(runs) if c not in keys]
    out = []
    for _, df in groups:
        metric = _metric_of(df)
        s = _scale(metric)
        key = stats.config_id(df, keys).iloc[0]
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        est = _same(_estimates(st, "mean", "test_metric"), keys, key)
        pen, ref = est[est["penalty_param"].notna()], est[est["penalty_param"].isna()]
        methods = df["method"].unique()
        for lab, e in pen.groupby(pen.apply(lambda r: _label(r.drop("penalty_param"), label_cols), axis=1)):
            e = e.sort_values("penalty_param")
            c = _color(e["method"].iloc[0], methods)
            ax.errorbar(
                e["penalty_param"],
                s * e["mean"],
                yerr=_yerr(e, s),
                marker="o",
                capsize=3,
                color=c,
                label=f"{lab}{_n_note(e)}",
            )
            pr = _same(_estimates(st, "mean", "test_metric_projected"), keys, key)
            pr = pr[(pr["method"] == e["method"].iloc[0]) & pr["penalty_param"].notna()].sort_values(
                "penalty_param"
            )
            if len(pr):
                ax.errorbar(
                    pr["penalty_param"],
                    s * pr["mean"],
                    yerr=_yerr(pr, s),
                    ls=":",
                    marker=".",
                    capsize=2,
                    color=c,
                    alpha=0.6,
                    label=f"{lab}, projected",
                )
        for _, r in ref.iterrows():
            c = _color(r["method"], methods)
            ax.axhline(
                s * r["mean"],
                ls="--",
                color=c,
                label=f"{_label(r, label_cols)} (no penalty_param{'; n = 1: no interval' * (r['n'] < 2)})",
            )
            if r["n"] >= 2:
                ax.axhspan(s * r["ci_low"], s * r["ci_high"], color=c, alpha=0.12, lw=0)
        set_penalty_axis(ax, df["penalty_param"])
        _mark_not_ok(ax, df[df["status"] != "ok"], "penalty_param")
        ax.set_xlabel(
            "penalty_param" + (" (symmetric log: 0 included)" if ax.get_xscale() == "symlog" else "")
        )
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.set_title(f"{df['task'].iloc[0]}: mean over seeds, bars and bands: 95% t interval", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        name = "metric_vs_penalty.png" if len(groups) == 1 else f"metric_vs_penalty_{len(out)}.png"
        _save(fig, folder / name)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# curves against step and training time


def _curve_rows(h: pd.DataFrame) -> pd.DataFrame:
    """Step rows when the history has them, epoch rows otherwise."""
    steps = h[h["kind"] == "step"]
    return steps if len(steps) else h[h["kind"] == "epoch"]


def _band(ax, rows: pd.DataFrame, x: str, y: str, scale: float, **kw) -> None:
    """Mean over seeds of ``y`` at each optimiser step, min-max band; x is the step or the mean
    training time at that step."""
    r = rows[rows[y].notna()]
    if r.empty or x not in r:
        return
    g = r.groupby("step").agg(x=(x, "mean"), mean=(y, "mean"), lo=(y, "min"), hi=(y, "max")).sort_index()
    if len(g) < 30:
        kw.setdefault("marker", ".")  # visible even with one logged row
    (line,) = ax.plot(g["x"], scale * g["mean"], **kw)
    if len(g) > 1:
        ax.fill_between(g["x"], scale * g["lo"], scale * g["hi"], color=line.get_color(), alpha=0.15, lw=0)


def plot_curves(runs: pd.DataFrame, hist: pd.DataFrame, folder: Path) -> list[str]:
    """Per task: training loss, validation metric (test metric at epoch ends in folders without a
    validation split) and feasibility raw / effective (log scale) against optimiser step (top) and
    training wall time (bottom), mean over seeds with the min-max band."""
    if hist.empty or "step" not in hist:
        return []
    extra = [c for c in stats.config_columns(runs) if c not in hist.columns]
    hist = hist.merge(runs[["run_id", *extra]], on="run_id", how="left") if extra else hist
    label_cols = _varying(runs)
    out = []
    for task, h in hist.groupby("task"):
        r = runs[runs["task"] == task]
        metric = _metric_of(r)
        baseline = r["baseline"].dropna().iloc[0] if "baseline" in r and r["baseline"].notna().any() else None
        rows = _curve_rows(h)
        has_val = "val_metric" in rows and rows["val_metric"].notna().any()
        mid, mid_rows = ("val_metric", rows) if has_val else ("test_metric", h[h["kind"] == "epoch"])
        mid_label = (
            "validation " if has_val else "test (epoch ends; no validation split) "
        ) + METRIC_LABEL.get(metric, metric).replace("test ", "")
        fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex="row")
        labels = (
            h.drop_duplicates("run_id").set_index("run_id").apply(lambda x: _label(x, label_cols), axis=1)
        )
        for lab, g in h.groupby(h["run_id"].map(labels)):
            c = _color(lab, labels)
            rid = set(g["run_id"])
            sub, msub = rows[rows["run_id"].isin(rid)], mid_rows[mid_rows["run_id"].isin(rid)]
            for i, x in enumerate(("step", "train_wall_s")):
                _band(axes[i, 0], sub, x, "train_loss", 1.0, color=c, label=lab)
                if mid in msub:
                    _band(axes[i, 1], msub, x, mid, _scale(metric), color=c, label=lab)
                _band(axes[i, 2], sub, x, "feasibility_raw", 1.0, color=c, label=f"{lab} raw")
                if "feasibility_eff" in sub and (sub["feasibility_eff"] != sub["feasibility_raw"]).any():
                    _band(
                        axes[i, 2], sub, x, "feasibility_eff", 1.0, color=c, ls="--", label=f"{lab} effective"
                    )
        for i, xl in enumerate(("optimiser step", "training wall time (s, evaluation excluded)")):
            for j, yl in enumerate(("training loss", mid_label, "max ||W^T W - I||_F (dashed: effective)")):
                ax = axes[i, j]
                ax.set_xlabel(xl)
                ax.set_ylabel(yl, fontsize=8)
                ax.grid(alpha=0.3, which="both")
                if (
                    j == 2
                    or (j == 0 and (rows["train_loss"].dropna() > 0).all())
                    or (j == 1 and metric != "acc")
                ):
                    ax.set_yscale("log")
                if baseline is not None and j == 1 and metric != "acc":
                    ax.axhline(baseline, color="k", ls="--", lw=1, label=f"baseline {baseline:.3g}")
        axes[0, 1].legend(fontsize=6)
        axes[0, 2].legend(fontsize=5, ncol=2)
        kind = "step" if (rows["kind"] == "step").any() else "epoch"
        n = h.groupby(h["run_id"].map(labels))["seed"].nunique()
        fig.suptitle(
            f"{task}: mean over seeds (n = {n.min()}"
            + (f"-{n.max()}" if n.max() != n.min() else "")
            + f"), band: min-max over seeds; from {kind} rows",
            fontsize=10,
        )
        name = f"curves_{task}.png"
        _save(fig, folder / name, 100)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# time to target


def plot_time_to_target(runs: pd.DataFrame, folder: Path) -> list[str]:
    """Per task: steps and training seconds to the target per configuration; one dot per seed,
    a bar at the mean of the runs that reached it, runs that never did as red crosses at the
    right edge.  Needs the harness's ``steps_to_target``, ``seconds_to_target`` and
    ``target_value`` columns."""
    cols = ("steps_to_target", "seconds_to_target", "target_value")
    if not all(c in runs for c in cols):
        return []
    ok = runs[(runs["status"] == "ok") & runs["target_value"].notna()]
    label_cols = _varying(runs)
    out = []
    for task, df in ok.groupby("task"):
        labels = df.apply(lambda r: _label(r, label_cols), axis=1)
        order = list(dict.fromkeys(labels))
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(order) + 2), sharey=True)
        for ax, col, xl in zip(axes, cols[:2], ("optimiser steps", "training seconds")):
            xmax = df[col].max() if df[col].notna().any() else 1.0
            for y, lab in enumerate(order):
                g = df[labels == lab]
                hit, never = g[g[col].notna()], g[g[col].isna()]
                c = _color(lab, order)
                ax.scatter(hit[col], np.full(len(hit), y), color=c, alpha=0.7, zorder=3)
                if len(hit):
                    ax.plot([hit[col].mean()] * 2, [y - 0.3, y + 0.3], color="k", lw=2)
                if len(never):
                    ax.scatter(
                        np.full(len(never), 1.08 * xmax), np.full(len(never), y), marker="x", color="red"
                    )
                ax.annotate(f"{len(hit)}/{len(g)}", (1.12 * xmax, y), fontsize=7, va="center")
            ax.set_xlim(0, 1.2 * xmax)
            ax.set_xlabel(xl)
            ax.grid(alpha=0.3, axis="x")
        axes[0].set_yticks(range(len(order)), order, fontsize=7)
        target = df["target_value"].iloc[0]
        fig.suptitle(
            f"{task}: time to validation {_metric_of(df)} {target:g}; dots: seeds, bar: mean of "
            "the runs that reached it, red x: never reached, k/n: reached",
            fontsize=9,
        )
        name = f"time_to_target_{task}.png"
        _save(fig, folder / name)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# metric against any swept configuration column


def plot_vs_axis(runs: pd.DataFrame, st: pd.DataFrame, folder: Path) -> list[str]:
    """For every configuration column (other than method, seed, penalty_param) with more than one
    value: the test metric (and at the best validation step, when recorded) against it, one line
    per other configuration, mean with 95% CI error bars; log x when all values are positive and
    span more than 10x, categories otherwise when not numeric.  Runs not ok: red crosses."""
    out = []
    for col in _varying(runs):
        if col == "task":
            continue
        quantities = [
            q for q in ("test_metric", "test_metric_at_best_val") if not _estimates(st, "mean", q).empty
        ]
        if not quantities:
            continue
        values = runs[col].dropna()
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        cats = None if numeric else sorted(values.map(str).unique())
        metric = _metric_of(runs)
        s = _scale(metric)
        others = [c for c in _varying(runs) if c != col]
        fig, axes = plt.subplots(1, len(quantities), figsize=(6.5 * len(quantities), 4.5), squeeze=False)
        for ax, q in zip(axes[0], quantities):
            est = _estimates(st, "mean", q)
            est = est[est[col].notna()]
            labels = est.apply(_label, axis=1, args=(others,))
            for lab, e in est.groupby(labels, sort=False):
                e = e.assign(_x=_positions(e[col], cats)).sort_values("_x")
                ax.errorbar(
                    e["_x"],
                    s * e["mean"],
                    yerr=_yerr(e, s),
                    marker="o",
                    capsize=3,
                    color=_color(lab, labels),
                    label=f"{lab}{_n_note(e)}",
                )
            bad = runs[runs["status"] != "ok"]
            _mark_not_ok(ax, bad.assign(_x=_positions(bad[col], cats)), "_x")
            if numeric and (values > 0).all() and values.max() > 10 * values.min():
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(cats)), cats)
            ax.set_xlabel(col)
            ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)}, {QUANTITY_LABEL[q]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(f"mean over seeds, bars: 95% t interval; against {col}", fontsize=9)
        name = f"metric_vs_{col}.png"
        _save(fig, folder / name)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# throughput relative to the baseline


def _whole_run(runs: pd.DataFrame) -> bool:
    """Whether train_samples_per_s is the whole-run figure (folders that also record the
    steady-state ``step_samples_per_s``); older folders hold a short timed measurement."""
    return "step_samples_per_s" in runs


def plot_throughput(runs: pd.DataFrame, st: pd.DataFrame, folder: Path) -> list[str]:
    """Training throughput relative to the unconstrained baseline per configuration: geometric
    mean of the per-seed ratios with its 95% interval (log scale), and ``step_vs_baseline``
    (paired steady-state ratio) beside it when recorded."""
    ratio = _estimates(st, "ratio", "train_samples_per_s")
    if ratio.empty:
        return []
    base = ratio["baseline"].iloc[0]
    step = _estimates(st, "mean", "step_vs_baseline")
    label_cols = _varying(runs)
    keys = stats.config_columns(runs)
    ratio = ratio.assign(_id=stats.config_id(ratio, keys)).sort_values("mean", ascending=False)
    step = step.assign(_id=stats.config_id(step, keys)).set_index("_id") if len(step) else step
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(ratio) + 3), 4.5))
    x = np.arange(len(ratio))
    w = 0.4 if len(step) else 0.7
    ax.bar(
        x - (w / 2 if len(step) else 0),
        ratio["mean"],
        w,
        yerr=_yerr(ratio, 1.0),
        capsize=3,
        label="whole run, train_samples_per_s"
        if _whole_run(runs)
        else "train_samples_per_s (short timed run)",
    )
    for i, (v, top) in enumerate(zip(ratio["mean"], ratio["ci_high"].fillna(ratio["mean"]))):
        ax.text(x[i] - (w / 2 if len(step) else 0), top, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    if len(step):
        s = step.reindex(ratio["_id"])
        ax.bar(
            x + w / 2, s["mean"], w, yerr=_yerr(s, 1.0), capsize=3, label="step_vs_baseline (paired steps)"
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
        x, [_label(r, label_cols) for _, r in ratio.iterrows()], rotation=25, ha="right", fontsize=7
    )
    ax.set_ylabel(f"samples/s relative to {base} (> 1: faster)")
    ax.set_title(
        f"throughput relative to {base}: mean of per-seed ratios, bars: 95% t interval{_n_note(ratio)}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    _save(fig, folder / "throughput.png")
    return ["throughput.png"]


def plot_confusions(runs, folder: Path) -> list[str]:
    from sklearn.metrics import ConfusionMatrixDisplay

    out = []
    if "confusion" not in runs:
        return out
    ok = runs[(runs["status"] == "ok") & runs["confusion"].notna()]
    # one matrix per method, and per cell when the sweep ran several (confusion_<method>_<cell>.png)
    by_cell = "cell" in ok and ok["cell"].nunique() > 1
    for key, g in ok.groupby(["method", "cell"] if by_cell else "method"):
        method = "_".join(key) if by_cell else (key[0] if isinstance(key, tuple) else key)
        if g["test_metric"].isna().all():  # an ok row with an empty test metric: nothing to rank by
            print(
                f"bench.plot: note: no confusion matrix for {method}: its ok runs "
                f"({', '.join(map(str, g['run_id']))}) record no test metric",
                file=sys.stderr,
            )
            continue
        best = g.loc[g["test_metric"].idxmax()]
        cm = np.array(json.loads(best["confusion"]))
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ConfusionMatrixDisplay(cm).plot(ax=ax, colorbar=False, values_format="d")
        pen = "" if pd.isna(best["penalty_param"]) else f", penalty_param={best['penalty_param']:g}"
        ax.set_title(
            f"{method}{pen}: {100 * best['test_metric']:.2f}% of {int(cm.sum())} test images", fontsize=9
        )
        name = f"confusion_{method}.png"
        _save(fig, folder / name, 100)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# summary.md


def _num(v, quantity: str, metric) -> str:
    if pd.isna(v):
        return "–"
    if "metric" in quantity:
        return f"{100 * v:.2f}" if metric == "acc" else f"{v:.4g}"
    if quantity.startswith("feasibility"):
        return f"{v:.3g}"
    if quantity == "train_samples_per_s":
        return f"{v:.0f}"
    return f"{v:.3f}"


def _est_cell(e, quantity: str, metric) -> str:
    """``mean ± half-width (n=k)``; ``value (n=1, no interval)``; a ratio (geometric mean,
    interval from the log scale, not symmetric): ``mean [low, high] (n=k)``."""
    if e is None:
        return "–"
    if e["n"] < 2:
        return f"{_num(e['mean'], quantity, metric)} (n=1, no interval)"
    if quantity == "ratio":
        lo, hi = (_num(e[k], quantity, metric) for k in ("ci_low", "ci_high"))
        return f"{_num(e['mean'], quantity, metric)} [{lo}, {hi}] (n={int(e['n'])})"
    half = (e["ci_high"] - e["ci_low"]) / 2
    return f"{_num(e['mean'], quantity, metric)} ± {_num(half, quantity, metric)} (n={int(e['n'])})"


def _config_rows(runs: pd.DataFrame):
    """(label columns dict, runs) per configuration, sorted by the configuration columns (the
    order of completion, which packing changes, would reorder the tables from sweep to sweep)."""
    keys = stats.config_columns(runs)
    show = ["method", "penalty_param", *_varying(runs)]
    for _, g in runs.groupby(keys, dropna=False, sort=True):
        r = g.iloc[0]
        yield (
            {c: ("" if pd.isna(r[c]) else r[c]) for c in show if c in r},
            stats.config_id(g.iloc[:1], keys).iloc[0],
            g,
        )


def _lookup(est: pd.DataFrame, runs: pd.DataFrame) -> dict:
    if est.empty:
        return {}
    return dict(zip(stats.config_id(est, stats.config_columns(runs)), (r for _, r in est.iterrows())))


def results_table(runs: pd.DataFrame, st: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: ok runs / runs, then mean ± 95% CI half-width (n) of every quantity
    of stats.csv but throughput."""
    metric = _metric_of(runs)
    qs = [
        q
        for q in stats.QUANTITIES
        if q not in ("train_samples_per_s", "step_vs_baseline") and not _estimates(st, "mean", q).empty
    ]
    looks = {q: _lookup(_estimates(st, "mean", q), runs) for q in qs}
    rows = []
    for show, cid, g in _config_rows(runs):
        d = {**show, "ok / runs": f"{int((g['status'] == 'ok').sum())}/{len(g)}"}
        for q in qs:
            name = (
                f"{METRIC_LABEL.get(metric, metric)}, {QUANTITY_LABEL[q]}"
                if "metric" in q
                else QUANTITY_LABEL[q]
            )
            d[name] = _est_cell(looks[q].get(cid), q, metric)
        rows.append(d)
    return pd.DataFrame(rows)


def paired_markdown(runs: pd.DataFrame, diff: pd.DataFrame) -> str:
    """One paired table (one baseline, one quantity) as markdown."""
    metric = _metric_of(runs)
    unit = " (percentage points)" if metric == "acc" else ""
    cols = ["method", "penalty_param", *[c for c in _varying(runs) if c in diff]]
    rows = []
    for _, r in diff.iterrows():
        q = r["quantity"]
        d = {c: ("" if pd.isna(r[c]) else r[c]) for c in cols}
        d["pairs"] = int(r["n"])
        d[f"mean difference{unit}"] = ("+" if r["mean"] > 0 else "") + _num(r["mean"], q, metric)
        d["95% CI"] = (
            "no interval (n = 1)"
            if r["n"] < 2
            else f"[{_num(r['ci_low'], q, metric)}, {_num(r['ci_high'], q, metric)}]"
        )
        d["test"] = r["test"] or "none (n < 2)"
        d["p"] = "–" if pd.isna(r["p_value"]) else f"{r['p_value']:.3g}"
        d["verdict"] = r["verdict"]
        rows.append(d)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def throughput_markdown(runs: pd.DataFrame, st: pd.DataFrame) -> str:
    tp = _lookup(_estimates(st, "mean", "train_samples_per_s"), runs)
    ratio = _estimates(st, "ratio", "train_samples_per_s")
    rl = _lookup(ratio, runs)
    sv = _lookup(_estimates(st, "mean", "step_vs_baseline"), runs)
    base = ratio["baseline"].iloc[0] if len(ratio) else None
    rows = []
    for show, cid, g in _config_rows(runs):
        ok = g.loc[g["status"] == "ok", "train_samples_per_s"].dropna()
        if ok.empty:
            continue
        d = {
            **show,
            "train samples/s": _est_cell(tp.get(cid), "train_samples_per_s", None),
            "min–max over seeds": f"{ok.min():.0f}–{ok.max():.0f}",
        }
        if base:
            r = rl.get(cid)
            d[f"vs {base} (per-seed ratio)"] = "–" if r is None else _est_cell(r, "ratio", None)
        if sv:
            d["step_vs_baseline"] = _est_cell(sv.get(cid), "step_vs_baseline", None)
        rows.append(d)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def time_to_target_markdown(runs: pd.DataFrame) -> str | None:
    if not all(c in runs for c in ("steps_to_target", "seconds_to_target", "target_value")):
        return None
    rows = []
    for show, _, g in _config_rows(runs):
        ok = g[(g["status"] == "ok") & g["target_value"].notna()]
        if ok.empty:
            continue
        per_seed = ", ".join(NEVER if pd.isna(s) else f"{s:.1f}" for s in ok["seconds_to_target"])
        steps = ", ".join(NEVER if pd.isna(s) else f"{int(s)}" for s in ok["steps_to_target"])
        rows.append(
            {
                **show,
                "target": f"{ok['target_value'].iloc[0]:g}",
                "reached": f"{int(ok['seconds_to_target'].notna().sum())}/{len(ok)}",
                "steps (per seed)": steps,
                "training seconds (per seed)": per_seed,
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else None


def write_summary(runs: pd.DataFrame, st: pd.DataFrame, folder: Path, images: list[str]) -> None:
    lines = [f"# Sweep summary: {folder.name}", ""]
    m = read_meta(folder)  # UsageError when malformed
    if m:
        lines += [
            f"Command: `{m.get('command')}`  ",
            f"git commit: `{m.get('git_commit')}`, torch "
            f"{m.get('torch_version')}, devices {m.get('device_names')}, {m.get('cpu_count')} CPUs.",
            "",
        ]
    counts = runs["status"].value_counts().to_dict()
    lines += [
        f"Runs: {len(runs)} ({', '.join(f'{v} {k}' for k, v in counts.items())}). Statistics over the ok "
        "runs of each configuration (the runs differing only in seed), also in `stats.csv`: mean ± "
        "half-width of the 95% Student-t confidence interval (n = runs).",
        "",
    ]
    means = _estimates(st, "mean", "test_metric")
    if len(means) and (means["n"] < 2).any():
        single = "every configuration" if (means["n"] < 2).all() else "some configurations"
        lines += [
            f"**n = 1** for {single}: a single run has no confidence interval and no test; the value shown "
            "is that run's, and differences between such values may be seed noise.",
            "",
        ]
    lines += [
        "## Results per configuration",
        "",
        results_table(runs, st).to_markdown(index=False, disable_numparse=True),
        "",
    ]
    diff = st[st["kind"] == "difference"] if len(st) else st
    if len(diff):
        lines += [
            "## Paired differences",
            "",
            "Method minus baseline at the same seed (same initial weights, same batches) and the same shared "
            "configuration; 95% Student-t interval of the mean difference; test: Wilcoxon signed-rank for "
            f"n >= {stats.WILCOXON_MIN_N} pairs, paired t otherwise (two-sided). The verdict follows the "
            'interval: "no detectable difference" when it contains 0.',
            "",
        ]
        for (base, q), d in diff.groupby(["baseline", "quantity"], sort=False):
            how = (
                "same penalty_param, granularity and lr_constrained"
                if base == "cdopt"
                else "method-specific settings ignored"
            )
            lines += [
                f"### {METRIC_LABEL.get(_metric_of(runs), 'test metric')}, {QUANTITY_LABEL.get(q, q)}: "
                f"method − `{base}` ({how})",
                "",
                paired_markdown(runs, d),
                "",
            ]
    if "train_samples_per_s" in runs and runs["train_samples_per_s"].notna().any():
        lines += ["## Throughput", ""]
        if _whole_run(runs):
            lines += [
                "`train samples/s`: the whole run's training throughput (samples trained / training seconds, "
                "evaluation excluded), mean ± 95% CI half-width over seeds, and its range. `vs` column: "
                "geometric mean of the per-seed ratios to the baseline run of the same seed and shape "
                "(> 1: faster) with its 95% interval, computed on the log scale. "
                "`step_vs_baseline`: steady-state steps timed interleaved with the baseline's.",
                "",
            ]
            if "perf_iters" in runs and runs["perf_iters"].min() < 10:
                lines += [
                    f"`step_vs_baseline` comes from only {int(runs['perf_iters'].min())} interleaved rounds "
                    "per run: read it as a smoke check, not a measurement (the whole-run figures are not "
                    "affected).",
                    "",
                ]
        else:
            lines += [
                "This folder predates whole-run throughput: `train_samples_per_s` here is a short timed "
                "measurement on a fixed batch, not the run's own throughput.",
                "",
            ]
            if "perf_iters" in runs and runs["perf_iters"].min() < 10:
                lines += [
                    f"It comes from only {int(runs['perf_iters'].min())} timed steps per run: read it as a "
                    "smoke check, not a measurement.",
                    "",
                ]
        lines += [throughput_markdown(runs, st), ""]
    ttt = time_to_target_markdown(runs)
    if ttt:
        lines += [
            "## Time to target",
            "",
            "First logged evaluation whose validation metric reaches the target; "
            "training seconds exclude evaluation; `never`: not reached within the run.",
            "",
            ttt,
            "",
        ]
    bad = runs[runs["status"] != "ok"]
    if len(bad):
        lines += ["## Runs that did not finish ok", ""]
        for _, r in bad.iterrows():
            ep = r.get("diverged_epoch")
            lines.append(
                f"- `{r['run_id']}` {r['method']} seed {r['seed']}: **{r['status']}**"
                f"{'' if pd.isna(ep) else f' in epoch {int(ep)}'}: {r.get('error', '')}"
            )
        lines.append("")
    lines += ["## Plots", ""] + [f"![{i}]({i})" for i in images]
    write_atomic(folder / "summary.md", "\n".join(lines) + "\n")


def make_all(folder) -> list[str]:
    """Write stats.csv, draw every plot and write summary.md for ``folder``; returns the image names."""
    folder = Path(folder)
    read_meta(folder)  # a malformed meta.json is refused before anything is written
    runs, hist = _read(folder)
    st = stats.all_stats(runs) if len(runs) else pd.DataFrame()
    write_csv(st, folder / "stats.csv")
    images = []
    if len(runs):
        images += plot_metric_vs_penalty(runs, st, folder)
        images += plot_curves(runs, hist, folder)
        images += plot_time_to_target(runs, folder)
        images += plot_vs_axis(runs, st, folder)
        images += plot_throughput(runs, st, folder)
        images += plot_confusions(runs, folder)
    write_summary(runs, st, folder, images)
    return images


USAGE = (
    "usage: python -m bench.plot FOLDER\n\n"
    "Writes stats.csv, summary.md and the plots of the sweep in FOLDER (a bench.ablate --out\n"
    "folder holding runs.csv) into FOLDER."
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) != 1 or not (Path(argv[0]) / "runs.csv").is_file():
        got = argv[0] if argv else "nothing"
        print(f"bench.plot: error: expected one folder holding runs.csv; got {got!r}", file=sys.stderr)
        return 2
    try:
        check_folder(argv[0], "bench.plot")
    except UsageError as e:
        print(f"bench.plot: error: {e}", file=sys.stderr)
        return 2
    if "run_id" not in _read_complete(Path(argv[0]) / "runs.csv"):
        print(f"bench.plot: error: {Path(argv[0]) / 'runs.csv'} holds no header row (empty)", file=sys.stderr)
        return 2
    try:
        images = make_all(argv[0])  # UsageError: a link, a malformed meta.json
    except UsageError as e:
        print(f"bench.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote stats.csv, {len(images)} plots and summary.md in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
