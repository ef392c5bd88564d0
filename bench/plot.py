"""Plots and summary.md from a sweep's CSV files alone.

Usage: ``python -m bench.plot <folder>`` redraws everything in ``<folder>`` from its
runs.csv and history.csv.  Runs that diverged or failed are drawn as such (red
crosses on the accuracy plots, listed in summary.md), never as NaN points or
silently dropped rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ARCH = ["task", "num_layers", "hidden_size", "bidirectional", "granularity", "epochs", "batch_size", "lr",
        "lr_constrained", "device", "train_subset", "test_subset", "seq_len"]
METRIC_LABEL = {"acc": "test accuracy (%)", "ce": "test cross-entropy", "mse": "test MSE"}


def _save(fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _read(folder: Path):
    runs = pd.read_csv(folder / "runs.csv")
    hist = pd.read_csv(folder / "history.csv") if (folder / "history.csv").is_file() else pd.DataFrame()
    return runs, hist


def _scale(metric):
    return 100.0 if metric == "acc" else 1.0


def _as_str(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda col: col.map(str))


def _arch_key(df):
    cols = [c for c in ARCH if c in df.columns]
    return _as_str(df[cols]).agg("|".join, axis=1)


def _arch_label(row) -> str:
    return (f"{row['task']} L{row['num_layers']} H{row['hidden_size']} "
            f"{'bi' if str(row['bidirectional']) == 'True' else 'uni'} {row['granularity']} {row['device']}")


def plot_metric_vs_penalty(runs: pd.DataFrame, folder: Path) -> list[str]:
    out = []
    runs = runs.assign(_arch=_arch_key(runs))
    for arch, df in runs.groupby("_arch"):
        metric = df["metric"].dropna().iloc[0] if df["metric"].notna().any() else "acc"
        s = _scale(metric)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pen = df[df["penalty_param"].notna()]
        ok = pen[pen["status"] == "ok"]
        for method, g in ok.groupby("method"):
            stats = g.groupby("penalty_param")["test_metric"].agg(["mean", "std", "count"]).reset_index()
            ax.errorbar(stats["penalty_param"], s * stats["mean"], yerr=s * stats["std"].fillna(0), marker="o",
                        capsize=3, label=f"{method} (mean ± std over seeds)")
            if "test_metric_projected" in g:
                pst = g.groupby("penalty_param")["test_metric_projected"].mean()
                ax.plot(pst.index, s * pst.values, ls=":", marker=".", alpha=0.7, label=f"{method}, projected")
        others = df[df["penalty_param"].isna() & (df["status"] == "ok")]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (method, g) in enumerate(others.groupby("method")):
            ax.axhline(s * g["test_metric"].mean(), ls="--", color=colors[(i + 3) % len(colors)],
                       label=f"{method} (no penalty_param)")
        bad = df[df["status"] != "ok"]
        if len(bad):
            ylo = ax.get_ylim()[0]
            xs = bad["penalty_param"].fillna(pen["penalty_param"].min() if len(pen) else 1.0)
            ax.scatter(xs, [ylo] * len(bad), marker="x", color="red", zorder=5,
                       label=f"diverged/failed ({len(bad)})")
            for x, (_, r) in zip(xs, bad.iterrows()):
                ax.annotate(f"{r['method']} {r['status']}", (x, ylo), fontsize=7, color="red", rotation=30)
        if len(pen):
            ax.set_xscale("log")
        ax.set_xlabel("penalty_param")
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.set_title(_arch_label(df.iloc[0]), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"metric_vs_penalty_{len(out)}.png" if runs["_arch"].nunique() > 1 else "metric_vs_penalty.png"
        _save(fig, folder / name, 110)
        out.append(name)
    return out


def plot_feasibility(runs, hist, folder: Path) -> list[str]:
    if hist.empty:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, pen), g in hist.groupby(["method", hist["penalty_param"].fillna(-1)]):
        lab = method if pen < 0 else f"{method} penalty_param={pen:g}"
        mean = g.groupby("epoch")[["feasibility_raw", "feasibility_eff"]].mean()
        line, = ax.plot(mean.index, mean["feasibility_raw"].clip(lower=1e-12), marker="o", label=f"{lab} raw")
        if (mean["feasibility_eff"] != mean["feasibility_raw"]).any():
            ax.plot(mean.index, mean["feasibility_eff"].clip(lower=1e-12), ls="--", marker="x",
                    color=line.get_color(), label=f"{lab} effective")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("max ||W^T W - I||_F over recurrent weights")
    ax.set_title("feasibility (mean over seeds; dashed: the weight the forward uses)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, folder / "feasibility_vs_epoch.png", 110)
    return ["feasibility_vs_epoch.png"]


def throughput_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean train/eval samples/s per method and configuration, and the ratio to ``lstm``
    of the same configuration (task, model, batch, device) measured in the same sweep."""
    ok = runs[runs["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    keys = [c for c in ["task", "num_layers", "hidden_size", "bidirectional", "batch_size", "device", "seq_len"]
            if c in ok]
    ok["_cfg"] = _as_str(ok[keys]).agg("|".join, axis=1)
    agg = ok.groupby(["_cfg", "method"])[["train_samples_per_s", "eval_samples_per_s", "constraint_share"]].mean()
    agg = agg.reset_index()
    base = agg[agg["method"] == "lstm"].set_index("_cfg")
    for col in ("train_samples_per_s", "eval_samples_per_s"):
        agg[col.replace("samples_per_s", "vs_lstm")] = agg.apply(
            lambda r: r[col] / base.loc[r["_cfg"], col] if r["_cfg"] in base.index else np.nan, axis=1)
    return agg


def plot_curves(runs, hist, folder: Path) -> list[str]:
    """Per task: training loss and test metric against optimiser step and wall time,
    with the task's baseline (e.g. the memoryless copying loss) drawn where it has one."""
    if hist.empty:
        return []
    out = []
    for task, h in hist.groupby("task"):
        r = runs[runs["task"] == task]
        metric = r["metric"].dropna().iloc[0] if r["metric"].notna().any() else "acc"
        baseline = r["baseline"].dropna().iloc[0] if "baseline" in r and r["baseline"].notna().any() else None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        lab = h["method"] + h["penalty_param"].map(lambda p: "" if pd.isna(p) else f" penalty_param={p:g}")
        for key, g in h.groupby(lab):
            g = g.groupby("epoch")[["step", "train_wall_s", "train_loss", "test_metric"]].mean()
            col = "test_metric" if metric != "acc" else "train_loss"
            for ax, x in zip(axes, ("step", "train_wall_s")):
                ax.plot(g[x], g[col], marker=".", label=key)
        ylabel = METRIC_LABEL.get(metric, metric) if metric != "acc" else "training loss (cross-entropy)"
        for ax, xl in zip(axes, ("optimiser step", "training wall time (s)")):
            if baseline is not None:
                ax.axhline(baseline, color="k", ls="--", lw=1, label=f"baseline {baseline:.3g}")
            ax.set_xlabel(xl)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel + " (mean over seeds)")
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{task}: loss curves", fontsize=10)
        name = f"curves_{task}.png"
        _save(fig, folder / name, 100)
        out.append(name)
    return out


def plot_throughput(runs, folder: Path) -> list[str]:
    t = throughput_table(runs)
    if t.empty or t["train_vs_lstm"].isna().all():
        return []
    t = t.groupby("method")[["train_vs_lstm", "eval_vs_lstm"]].mean().sort_values("train_vs_lstm", ascending=False)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(t))
    ax.bar(x - 0.2, t["train_vs_lstm"], 0.4, label="train step")
    ax.bar(x + 0.2, t["eval_vs_lstm"], 0.4, label="eval forward")
    for i, v in enumerate(t["train_vs_lstm"]):
        ax.text(i - 0.2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, t.index, rotation=20)
    ax.set_ylabel("samples/s relative to lstm")
    ax.set_title("throughput relative to a plain nn.LSTM (same sweep, same shapes)", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, folder / "throughput.png", 110)
    return ["throughput.png"]


def plot_vs_size(runs, folder: Path) -> list[str]:
    out = []
    ok = runs[runs["status"] == "ok"]
    for col, name in (("hidden_size", "metric_vs_hidden.png"), ("num_layers", "metric_vs_layers.png")):
        if ok[col].nunique() < 2:
            continue
        metric = ok["metric"].iloc[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        lab = ok["method"] + ok["penalty_param"].map(lambda p: "" if pd.isna(p) else f" penalty_param={p:g}")
        for key, g in ok.groupby(lab):
            st = g.groupby(col)["test_metric"].agg(["mean", "std"])
            ax.errorbar(st.index, _scale(metric) * st["mean"], yerr=_scale(metric) * st["std"].fillna(0),
                        marker="o", capsize=3, label=key)
        ax.set_xlabel(col)
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, folder / name, 110)
        out.append(name)
    return out


def plot_confusions(runs, folder: Path) -> list[str]:
    from sklearn.metrics import ConfusionMatrixDisplay

    out = []
    ok = runs[(runs["status"] == "ok") & runs.get("confusion", pd.Series(dtype=str)).notna()]
    for method, g in ok.groupby("method"):
        best = g.loc[g["test_metric"].idxmax()]
        cm = np.array(json.loads(best["confusion"]))
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ConfusionMatrixDisplay(cm).plot(ax=ax, colorbar=False, values_format="d")
        pen = "" if pd.isna(best["penalty_param"]) else f", penalty_param={best['penalty_param']:g}"
        ax.set_title(f"{method}{pen}: {100 * best['test_metric']:.2f}% of {int(cm.sum())} test images", fontsize=9)
        name = f"confusion_{method}.png"
        _save(fig, folder / name, 100)
        out.append(name)
    return out


def _fmt(mean, std, scale=1.0, digits=2):
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["method", "penalty_param"] + [c for c in ARCH if c in runs.columns and runs[c].nunique(dropna=False) > 1]
    rows = []
    for key, g in runs.groupby([runs[k].map(str) for k in keys], sort=False):
        ok = g[g["status"] == "ok"]
        metric = g["metric"].dropna().iloc[0] if g["metric"].notna().any() else "acc"
        s = _scale(metric)
        d = dict(zip(keys, key))
        d["penalty_param"] = "" if d["penalty_param"] == "nan" else d["penalty_param"]
        d.update({
            "seeds ok": f"{len(ok)}/{len(g)}",
            "not ok": ", ".join(f"{st} seed {sd}" for st, sd in zip(g.loc[g.status != "ok", "status"],
                                                                    g.loc[g.status != "ok", "seed"])) or "",
            METRIC_LABEL.get(metric, metric): _fmt(ok["test_metric"].mean(), ok["test_metric"].std(), s),
            "after projection": _fmt(ok["test_metric_projected"].mean(), ok["test_metric_projected"].std(), s),
            "feasibility raw": f"{ok['feasibility_raw'].mean():.2e}" if len(ok) else "–",
            "feasibility eff": f"{ok['feasibility_eff'].mean():.2e}" if len(ok) else "–",
            "train samples/s": _fmt(ok["train_samples_per_s"].mean(), None, 1, 0),
            "eval samples/s": _fmt(ok["eval_samples_per_s"].mean(), None, 1, 0),
            "constraint share": f"{100 * ok['constraint_share'].mean():.1f}%" if len(ok) else "–",
        })
        rows.append(d)
    return pd.DataFrame(rows)


def write_summary(runs, folder: Path, images: list[str]) -> None:
    lines = [f"# Sweep summary: {folder.name}", ""]
    meta = folder / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        lines += [f"Command: `{m.get('command')}`  ", f"git commit: `{m.get('git_commit')}`, torch "
                  f"{m.get('torch_version')}, devices {m.get('device_names')}, {m.get('cpu_count')} CPUs.", ""]
    counts = runs["status"].value_counts().to_dict()
    lines += [f"Runs: {len(runs)} ({', '.join(f'{v} {k}' for k, v in counts.items())}). "
              "Mean ± std over seeds; throughput measured after warm-up on a fixed batch "
              "(samples/s; 'vs lstm' > 1 is faster).", ""]
    if "perf_iters" in runs and runs["perf_iters"].min() < 10:
        lines += [f"Note: throughput here comes from only {int(runs['perf_iters'].min())} timed steps per run: "
                  "read it as a smoke check, not a measurement (use `nox -s perf` or a quick/paper sweep).", ""]
    lines += [summary_table(runs).to_markdown(index=False), ""]
    t = throughput_table(runs)
    if not t.empty and t["train_vs_lstm"].notna().any():
        lines += ["## Throughput relative to lstm", "",
                  t.drop(columns="_cfg").rename(columns={"train_vs_lstm": "train vs lstm",
                                                         "eval_vs_lstm": "eval vs lstm"}).to_markdown(
                      index=False, floatfmt=".3g"), ""]
    bad = runs[runs["status"] != "ok"]
    if len(bad):
        lines += ["## Runs that did not finish ok", ""]
        lines += [f"- `{r.run_id}` {r.method} seed {r.seed}: **{r.status}**"
                  f"{'' if pd.isna(r.diverged_epoch) else f' in epoch {int(r.diverged_epoch)}'}: {r.error}"
                  for r in bad.itertuples()]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{i}]({i})" for i in images]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")


def make_all(folder) -> list[str]:
    """Draw every plot and write summary.md for ``folder``; returns the image names."""
    folder = Path(folder)
    runs, hist = _read(folder)
    images = []
    if len(runs):
        images += plot_metric_vs_penalty(runs, folder)
        images += plot_feasibility(runs, hist, folder)
        images += plot_curves(runs, hist, folder)
        images += plot_throughput(runs, folder)
        images += plot_vs_size(runs, folder)
        images += plot_confusions(runs, folder)
    write_summary(runs, folder, images)
    return images


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "runs.csv").is_file():
        got = argv[0] if argv else "nothing"
        print(f"bench.plot: error: expected one folder holding runs.csv; got {got!r}", file=sys.stderr)
        return 2
    images = make_all(argv[0])
    print(f"wrote {len(images)} plots and summary.md in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
