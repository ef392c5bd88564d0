"""Statistics over seeds of a sweep's ``runs.csv``: intervals, paired differences, time to target.

Pure functions on pandas DataFrames (one row per run, the columns of ``runs.csv``); no
plotting, no files.  ``bench.plot`` draws and writes ``stats.csv`` / ``summary.md`` from them.

Conventions
-----------
* A *configuration* is a run's configuration columns (:data:`CONFIG_COLUMNS` present in the
  table) except ``seed``: the runs of one configuration differ only in their seed.
* Only runs with ``status == "ok"`` enter a statistic; ``n_runs`` counts every seed of the
  configuration, whatever its status, so that failures stay visible.
* A statistic counts distinct seeds: several rows of one configuration and seed (the same
  training recorded under several run_ids, e.g. by a version whose run_id told a given
  ``--log-every`` from the automatic one) count once (:func:`distinct_seeds`), with a note.
* 95% intervals are Student-t intervals of a mean; with one value no interval exists and
  the interval columns are empty (NaN) with a note saying so.  Nothing is ever filled in.
* Old CSVs lack some columns: a quantity whose column is absent (or empty) is skipped.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats as sps

#: Every configuration column runs.csv may hold (bench.runner.RunConfig's fields, today's and
#: announced ones); a test checks that RunConfig has no field missing here.
CONFIG_COLUMNS = (
    "method",
    "task",
    "seed",
    "cell",
    "nonlinearity",
    "num_layers",
    "hidden_size",
    "bidirectional",
    "granularity",
    "penalty_param",
    "epochs",
    "batch_size",
    "lr",
    "lr_constrained",
    "optimizer",
    "schedule",
    "clip",
    "weight_decay",
    "init",
    "amp",
    "device",
    "profile",
    "train_subset",
    "test_subset",
    "val_size",
    "seq_len",
    "target",
    "log_every",
    "eval_every",
    "perf_iters",
    "threads",
)
#: Columns that only some methods use: ignored when pairing with the unconstrained baseline.
METHOD_SPECIFIC = ("method", "penalty_param", "granularity", "lr_constrained")
#: Columns that record how a run was scheduled or timed, not how it trained.
BOOKKEEPING = ("run_id", "profile", "perf_iters")
#: Quantities summarised per configuration by :func:`stats_table` (those present).
QUANTITIES = (
    "test_metric",
    "test_metric_projected",
    "test_metric_at_best_val",
    "feasibility_raw",
    "feasibility_eff",
    "train_samples_per_s",
    "step_vs_baseline",
)
#: Quantities compared seed by seed against a baseline by :func:`paired_table`.
PAIRED_QUANTITIES = ("test_metric", "test_metric_at_best_val")
#: Direction of each task metric (runs.csv ``metric``): True when higher is better.
HIGHER_IS_BETTER = {"acc": True, "ce": False, "mse": False}
#: Names of the unconstrained baseline method, newest first (``lstm`` is the old name).
UNCONSTRAINED = ("unconstrained", "lstm")
#: Smallest number of pairs for which :func:`paired_test` uses the Wilcoxon signed-rank test.
WILCOXON_MIN_N = 6
NO_INTERVAL = "n = 1: no interval"
#: note of an estimate some of whose seeds had several rows (:func:`distinct_seeds`)
DUPLICATES = "{} duplicate row(s) of a seed counted once"


def config_columns(runs: pd.DataFrame, without=("seed",)) -> list[str]:
    """The configuration columns present in ``runs``, in :data:`CONFIG_COLUMNS` order.

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.
    without : iterable of str
        Columns to leave out (default: ``seed``, so that the result identifies a configuration).
    """
    return [c for c in CONFIG_COLUMNS if c in runs.columns and c not in without]


def distinct_seeds(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and seed: duplicates never make an interval or a test.

    Rows equal in every configuration column, the seed included (:func:`config_columns` with
    ``without=()``), are one training (every run of a seed starts from the same weights and
    sees the same batches), however many run_ids recorded it.  The row kept is an ok one when
    there is one, then the one with the smallest ``run_id`` (deterministic).

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.

    Returns
    -------
    DataFrame
        The kept rows, in their original order, with an int column ``_duplicates``: how many
        rows of that configuration and seed were dropped (0 for most).
    """
    keys = config_columns(runs, without=())
    if runs.empty or not keys:
        return runs.assign(_duplicates=0)
    order = pd.DataFrame(
        {
            "_not_ok": (runs["status"] != "ok") if "status" in runs else False,
            "_rid": runs["run_id"].astype(str) if "run_id" in runs else "",
        },
        index=runs.index,
    ).sort_values(["_not_ok", "_rid"], kind="stable")
    ranked = runs.loc[order.index]
    cid = config_id(ranked, keys)
    kept = ranked[~cid.duplicated()]
    counts = cid.value_counts()
    return kept.assign(_duplicates=(config_id(kept, keys).map(counts) - 1).astype(int)).sort_index()


def _duplicates_note(g: pd.DataFrame, note: str = "") -> str:
    """``note``, with :data:`DUPLICATES` appended when rows of ``g`` stood for several rows."""
    n = sum(int(g[c].sum()) for c in ("_duplicates", "_duplicates_base") if c in g)
    return "; ".join(x for x in (note, DUPLICATES.format(n) if n else "") if x)


def default_baseline(runs: pd.DataFrame) -> str | None:
    """The unconstrained baseline's name in ``runs``: ``unconstrained`` if present, else ``lstm``,
    else None."""
    present = set(runs["method"]) if "method" in runs else set()
    return next((m for m in UNCONSTRAINED if m in present), None)


def higher_is_better(quantity: str, metric: str | None = None) -> bool | None:
    """Whether a larger value of ``quantity`` is better.

    Test and validation metrics follow the task's ``metric`` (acc: higher; ce, mse: lower;
    None when ``metric`` is unknown); feasibility and times to target: lower; throughputs and
    their ratios: higher.
    """
    if "metric" in quantity:
        return HIGHER_IS_BETTER.get(metric)
    if quantity.startswith("feasibility") or quantity.endswith("to_target"):
        return False
    if "samples_per_s" in quantity or quantity == "step_vs_baseline":
        return True
    return None


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean of ``values`` and its Student-t confidence interval.

    ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation
    (``ddof=1``) and ``t_{q, n-1}`` the q-quantile of Student's t distribution with n - 1 degrees of
    freedom (``scipy.stats.t.ppf``): the interval for the mean of a normal sample with unknown
    variance (Student, "The probable error of a mean", Biometrika 6(1):1-25, 1908).  With a handful
    of seeds it is wide (t_{0.975, 2} = 4.30) and rests on the normality of the per-seed values.
    NaN values are dropped first.

    Parameters
    ----------
    values : array-like of float
        One value per seed.
    confidence : float
        Coverage of the interval, in (0, 1).

    Returns
    -------
    dict
        ``n`` (int), ``mean``, ``std`` (ddof=1), ``ci_low``, ``ci_high`` (float; NaN where
        undefined: everything but ``n`` for n = 0, ``std`` and the interval for n = 1) and
        ``note`` (``"n = 1: no interval"`` for n = 1, else ``""``).
    """
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), dtype=float)
    n = len(x)
    out = {
        "n": n,
        "mean": math.nan,
        "std": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "note": NO_INTERVAL if n == 1 else "",
    }
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        out["std"] = float(x.std(ddof=1))
        half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * out["std"] / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


def _groups(runs: pd.DataFrame, keys: list[str]):
    """(key dict, rows) per distinct combination of ``keys`` (NaN is a value), in order of appearance."""
    if not keys:
        yield {}, runs
        return
    for key, g in runs.groupby(keys, dropna=False, sort=False):
        yield dict(zip(keys, key if isinstance(key, tuple) else (key,))), g


def config_id(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One string per row identifying its configuration (NaN spelled "nan", so it equals itself)."""
    return df[keys].apply(lambda col: col.map(str)).agg("|".join, axis=1) if keys else pd.Series("", df.index)


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "ok"] if "status" in runs else runs


def _present(runs: pd.DataFrame, quantities) -> list[str]:
    return [q for q in quantities if q in runs.columns and runs[q].notna().any()]


def _metric(g: pd.DataFrame):
    return g["metric"].dropna().iloc[0] if "metric" in g and g["metric"].notna().any() else None


def stats_table(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and Student-t interval of every quantity per configuration, over the ok runs.

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.
    confidence : float
        Coverage of the intervals.

    Returns
    -------
    DataFrame
        One row per configuration (all :func:`config_columns` but ``seed``) and quantity of
        :data:`QUANTITIES` present in ``runs``, with columns ``kind`` ("mean"), ``quantity``,
        the configuration columns, ``metric`` (the task's acc/ce/mse, when known), ``n`` (ok runs
        with a value), ``n_runs`` (all runs of the configuration), ``mean``, ``std``, ``ci_low``,
        ``ci_high``, ``note`` (see :func:`mean_ci`).  A configuration without any ok value of a
        quantity has no row for it.
    """
    keys = config_columns(runs)
    runs = distinct_seeds(runs)
    rows = []
    for key, g in _groups(runs, keys):
        ok = _ok(g)
        for q in _present(runs, QUANTITIES):
            est = mean_ci(ok[q], confidence)
            if est["n"]:
                est["note"] = _duplicates_note(ok[ok[q].notna()], est["note"])
                rows.append(
                    {"kind": "mean", "quantity": q, **key, "metric": _metric(g), "n_runs": len(g), **est}
                )
    return pd.DataFrame(rows)


def pair_runs(runs: pd.DataFrame, baseline: str, match=()) -> pd.DataFrame:
    """Each ok run of another method joined with the ok ``baseline`` run of the same seed and
    shared configuration.

    The shared configuration is every configuration column except ``method``, the method-specific
    :data:`METHOD_SPECIFIC` ones that are not in ``match``, and :data:`BOOKKEEPING`.  Every method
    starts from the same weights and sees the same batches for a given seed, so the two runs of a
    pair differ only in the method.

    When several baseline runs match one seed (e.g. ``lstm`` run once per granularity or per
    ``lr_constrained``: settings it does not use), they are the same training run recorded under
    different run_ids; the one with the smallest ``run_id`` is taken, so the choice is deterministic.

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.
    baseline : str
        Method name of the baseline.
    match : iterable of str
        Method-specific columns that must also be equal, e.g. :data:`METHOD_SPECIFIC` to compare
        ``cd`` with the reference ``cdopt`` at the same penalty_param and granularity.

    Returns
    -------
    DataFrame
        The method run's columns, and the baseline run's columns with the suffix ``_base``
        (only for the non-key ones).  Empty when nothing pairs.
    """
    ignored = set(METHOD_SPECIFIC) - set(match) | set(BOOKKEEPING) | {"method"}
    on = [c for c in config_columns(runs, without=()) if c not in ignored]
    ok = _ok(distinct_seeds(runs))
    base = ok[ok["method"] == baseline]
    other = ok[ok["method"] != baseline]
    if base.empty or other.empty:
        return pd.DataFrame()
    if "run_id" in base:
        base = base.sort_values("run_id", kind="stable")
    base = base.drop_duplicates(subset=on, keep="first")
    return other.merge(base, on=on, how="inner", suffixes=("", "_base"))


def paired_test(diff) -> tuple[str, float, float]:
    """Test of "the paired differences are centred on 0", two-sided.

    Wilcoxon signed-rank for n >= :data:`WILCOXON_MIN_N` (Wilcoxon, "Individual comparisons by
    ranking methods", Biometrics Bulletin 1(6), 1945; ``scipy.stats.wilcoxon`` with its defaults:
    zero differences dropped, exact null distribution for small samples without ties), paired
    Student t otherwise (``scipy.stats.ttest_1samp`` of the differences against 0, identical to
    ``ttest_rel``).  With n < 2 there is no test.

    Parameters
    ----------
    diff : array-like of float
        Paired differences (NaN dropped).

    Returns
    -------
    (test, statistic, p_value)
        ``test`` is "Wilcoxon signed-rank", "paired t" or "" (n < 2); the statistic and p-value
        are scipy's, NaN when there is no test or when every difference is 0 (undefined).
    """
    d = np.asarray(pd.Series(diff, dtype=float).dropna())
    if len(d) < 2:
        return "", math.nan, math.nan
    name = "Wilcoxon signed-rank" if len(d) >= WILCOXON_MIN_N else "paired t"
    if np.all(d == 0):
        return name, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's notes on tiny or constant samples
        res = sps.wilcoxon(d) if name.startswith("Wilcoxon") else sps.ttest_1samp(d, 0.0)
    return name, float(res.statistic), float(res.pvalue)


def verdict(ci_low: float, ci_high: float, higher: bool | None, baseline: str) -> str:
    """Words for a paired difference (method - baseline) and its interval.

    "identical to <baseline> in every pair" when every difference is 0 (the interval is
    [0, 0]); "no detectable difference" when the interval contains 0; "better than <baseline>" or
    "worse than <baseline>" when it lies on one side, following ``higher`` (True: higher is
    better; None: direction unknown, then "higher"/"lower than <baseline>"); "no interval" when
    the interval does not exist.
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "no interval"
    if ci_low == 0 == ci_high:
        return f"identical to {baseline} in every pair"
    if ci_low <= 0 <= ci_high:
        return "no detectable difference"
    up = ci_low > 0
    if higher is None:
        return f"{'higher' if up else 'lower'} than {baseline}"
    return f"{'better' if up == higher else 'worse'} than {baseline}"


def paired_table(
    runs: pd.DataFrame,
    baseline: str | None = None,
    quantity: str = "test_metric",
    match=(),
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per-seed paired differences ``method - baseline`` for every other configuration.

    Pairs come from :func:`pair_runs`.  Per configuration: the mean difference and its Student-t
    interval (:func:`mean_ci` of the differences), a paired test (:func:`paired_test`) and a
    :func:`verdict` taken from the interval, in the direction of ``quantity`` for the task
    (:func:`higher_is_better`).

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.
    baseline : str, optional
        Baseline method; default :func:`default_baseline` (``unconstrained`` or ``lstm``).
    quantity : str
        A runs.csv column, e.g. ``test_metric``.
    match : iterable of str
        Passed to :func:`pair_runs`.
    confidence : float
        Coverage of the intervals.

    Returns
    -------
    DataFrame
        One row per configuration with at least one pair: ``kind`` ("difference"), ``quantity``,
        ``baseline``, the configuration columns (without ``seed``), ``metric``, ``n`` (pairs),
        ``n_runs`` (runs of the configuration, any status), ``mean``, ``std``, ``ci_low``,
        ``ci_high``, ``note`` (of the differences), ``mean_method``, ``mean_baseline``, ``test``,
        ``statistic``, ``p_value``, ``verdict``.  Empty when the baseline or the column is absent.
    """
    baseline = baseline or default_baseline(runs)
    if baseline is None or quantity not in runs:
        return pd.DataFrame()
    pairs = pair_runs(runs, baseline, match)
    if pairs.empty:
        return pd.DataFrame()
    pairs = pairs[pairs[quantity].notna() & pairs[f"{quantity}_base"].notna()]
    keys = config_columns(runs)
    n_runs = config_id(distinct_seeds(runs), keys).value_counts()
    rows = []
    for key, g in _groups(pairs, keys):
        d = g[quantity] - g[f"{quantity}_base"]
        est = mean_ci(d, confidence)
        est["note"] = _duplicates_note(g, est["note"])
        test, stat, p = paired_test(d)
        rows.append(
            {
                "kind": "difference",
                "quantity": quantity,
                "baseline": baseline,
                **key,
                "metric": _metric(g),
                "n_runs": int(n_runs[config_id(g.iloc[:1], keys).iloc[0]]),
                **est,
                "mean_method": float(g[quantity].mean()),
                "mean_baseline": float(g[f"{quantity}_base"].mean()),
                "test": test,
                "statistic": stat,
                "p_value": p,
                "verdict": verdict(
                    est["ci_low"], est["ci_high"], higher_is_better(quantity, _metric(g)), baseline
                )
                if est["n"] >= 2
                else "n = 1: no interval, no test",
            }
        )
    return pd.DataFrame(rows)


def ratio_table(
    runs: pd.DataFrame,
    baseline: str | None = None,
    quantity: str = "train_samples_per_s",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per-seed ratio ``method / baseline`` of a throughput: geometric mean and interval.

    Pairs come from :func:`pair_runs` (same seed and shared configuration; the pairing only
    makes the two runs comparable in shape, a throughput does not depend on the seed).  The
    baseline's own row has ratio 1 and is included.  A ratio is averaged on the log scale:
    ``mean = exp(mean(log r))`` and the interval is :func:`mean_ci`'s Student-t interval of
    ``log r`` mapped back by ``exp``, so it is positive and symmetric in method and baseline
    (an arithmetic interval of three noisy ratios reached below 0).

    Parameters
    ----------
    runs : DataFrame
        Rows of runs.csv.
    baseline : str, optional
        Baseline method; default :func:`default_baseline`.
    quantity : str
        A throughput column of runs.csv (samples/s).
    confidence : float
        Coverage of the intervals.

    Returns
    -------
    DataFrame
        ``kind`` ("ratio"), ``quantity``, ``baseline``, configuration columns, ``n``, ``mean``
        (geometric), ``std`` (of ``log r``), ``ci_low``, ``ci_high``, ``note``, ``min``, ``max``
        of the per-seed ratios.
        Empty when the baseline or the column is absent.
    """
    baseline = baseline or default_baseline(runs)
    if baseline is None or quantity not in runs:
        return pd.DataFrame()
    ok = _ok(distinct_seeds(runs))
    own = ok[ok["method"] == baseline].assign(**{f"{quantity}_base": lambda d: d[quantity]})
    pairs = pd.concat([pair_runs(runs, baseline), own], ignore_index=True)
    if pairs.empty:
        return pd.DataFrame()
    pairs = pairs.assign(_ratio=pairs[quantity] / pairs[f"{quantity}_base"])
    rows = []
    for key, g in _groups(pairs, config_columns(runs)):
        r = pd.to_numeric(g["_ratio"], errors="coerce")
        est = mean_ci(np.log(r[r > 0]), confidence)
        if est["n"]:
            for k in ("mean", "ci_low", "ci_high"):
                est[k] = math.exp(est[k]) if math.isfinite(est[k]) else est[k]
            rows.append(
                {
                    "kind": "ratio",
                    "quantity": quantity,
                    "baseline": baseline,
                    **key,
                    **est,
                    "min": float(g["_ratio"].min()),
                    "max": float(g["_ratio"].max()),
                }
            )
    return pd.DataFrame(rows)


def baselines(runs: pd.DataFrame) -> list[tuple[str, tuple]]:
    """The comparisons a sweep supports: (baseline, match) for the unconstrained method (all
    method-specific settings ignored) and for ``cdopt`` (same penalty_param, granularity and
    lr_constrained: the reference implementation of ``cd``), those present."""
    out = []
    unconstrained = default_baseline(runs)
    if unconstrained:
        out.append((unconstrained, ()))
    if "method" in runs and (runs["method"] == "cdopt").any():
        out.append(("cdopt", METHOD_SPECIFIC))
    return out


def all_stats(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The rows of stats.csv, one estimate each, told apart by ``kind``.

    ``mean``: :func:`stats_table`; ``difference``: :func:`paired_table` for every quantity of
    :data:`PAIRED_QUANTITIES` present and every baseline of :func:`baselines`; ``ratio``:
    :func:`ratio_table` of ``train_samples_per_s`` against the unconstrained method.  Columns:
    ``kind``, ``quantity``, ``baseline`` (empty for means), the configuration columns, ``metric``,
    ``n_runs``, ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``, ``note``, then the columns
    particular to a kind.  Empty when ``runs`` has no ok value at all.
    """
    parts = [stats_table(runs, confidence)]
    for base, match in baselines(runs):
        for q in _present(runs, PAIRED_QUANTITIES):
            parts.append(paired_table(runs, base, q, match, confidence))
    if "train_samples_per_s" in runs:
        parts.append(ratio_table(runs, None, "train_samples_per_s", confidence))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    first = [
        "kind",
        "quantity",
        "baseline",
        *config_columns(runs),
        "metric",
        "n_runs",
        "n",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "note",
    ]
    first = [c for c in first if c in out]
    return out[first + [c for c in out if c not in first]]


def time_to_target(history: pd.DataFrame, target: float, higher_is_better: bool):
    """Optimiser steps and training seconds at the first logged evaluation whose validation
    metric reaches ``target``.

    Parameters
    ----------
    history : DataFrame
        history.csv rows of one run, with columns ``step``, ``train_wall_s`` (training seconds
        so far, evaluation excluded) and ``val_metric`` (empty where no evaluation was logged).
    target : float
        The value to reach (reached means ``>=`` when higher is better, ``<=`` otherwise).
    higher_is_better : bool
        Direction of the metric (acc: True; ce, mse: False).

    Returns
    -------
    (int, float) or None
        ``(steps, seconds)`` of the earliest such row (by step), or None when the target is never
        reached or there is no validation metric.

    Raises
    ------
    ValueError
        If ``history`` holds rows of more than one run_id.
    """
    if "run_id" in history and history["run_id"].nunique() > 1:
        raise ValueError(
            f"time_to_target: expected the history of one run; got run_ids "
            f"{sorted(history['run_id'].unique())}"
        )
    if "val_metric" not in history:
        return None
    h = history[history["val_metric"].notna()].sort_values("step", kind="stable")
    hit = h[h["val_metric"] >= target] if higher_is_better else h[h["val_metric"] <= target]
    if hit.empty:
        return None
    first = hit.iloc[0]
    return int(first["step"]), float(first["train_wall_s"])
