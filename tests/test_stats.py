"""bench.stats on synthetic runs.csv / history.csv rows with known answers."""

import math
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import stats

T975_2 = 4.302652729911275  # t_{0.975, 2} (tables; scipy.stats.t.ppf(0.975, 2))


def run(method, seed, value, penalty=None, metric="acc", status="ok", **cfg):
    row = {
        "run_id": f"{method}-{penalty}-{seed}-{cfg.get('granularity', 'stacked')}-{cfg.get('lr', 1e-3)}",
        "method": method,
        "task": "digits",
        "seed": seed,
        "num_layers": 1,
        "hidden_size": 16,
        "bidirectional": False,
        "granularity": "stacked",
        "penalty_param": penalty,
        "epochs": 2,
        "batch_size": 32,
        "lr": 1e-3,
        "lr_constrained": None,
        "device": "cpu",
        "profile": "smoke",
        "perf_iters": 5,
        "status": status,
        "metric": metric,
        "test_metric": value,
    }
    row.update(cfg)
    return row


def frame(rows):
    return pd.DataFrame(rows)


def only(df, **sel):
    for k, v in sel.items():
        df = df[df[k].isna()] if v is None else df[df[k] == v]
    assert len(df) == 1, df
    return df.iloc[0]


def test_mean_ci_known_interval():
    e = stats.mean_ci([1.0, 2.0, 3.0])
    assert e["n"] == 3 and e["mean"] == pytest.approx(2.0) and e["std"] == pytest.approx(1.0)
    half = T975_2 * 1.0 / np.sqrt(3)
    assert e["ci_low"] == pytest.approx(2.0 - half) and e["ci_high"] == pytest.approx(2.0 + half)
    assert e["note"] == ""


def test_mean_ci_single_value_has_no_interval():
    e = stats.mean_ci([0.9, np.nan])
    assert e["n"] == 1 and e["mean"] == pytest.approx(0.9)
    assert np.isnan(e["std"]) and np.isnan(e["ci_low"]) and np.isnan(e["ci_high"])
    assert e["note"] == "n = 1: no interval"
    assert stats.mean_ci([])["n"] == 0 and np.isnan(stats.mean_ci([])["mean"])


def test_paired_difference_1_2_3_contains_zero():
    base = [0.5, 0.6, 0.4]
    rows = [run("lstm", s, b) for s, b in enumerate(base)]
    rows += [run("cd", s, b + d, penalty=0.5) for s, (b, d) in enumerate(zip(base, [1.0, 2.0, 3.0]))]
    t = stats.paired_table(frame(rows), "lstm")
    r = only(t, method="cd")
    half = T975_2 / np.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(2.0)
    assert r["ci_low"] == pytest.approx(2.0 - half) and r["ci_high"] == pytest.approx(2.0 + half)
    assert r["test"] == "paired t"
    ref = sps.ttest_rel([b + d for b, d in zip(base, [1, 2, 3])], base)
    assert r["p_value"] == pytest.approx(ref.pvalue) and r["statistic"] == pytest.approx(ref.statistic)
    assert r["verdict"] == "no detectable difference"  # 2 - 2.48 < 0 < 2 + 2.48
    assert r["baseline"] == "lstm" and r["kind"] == "difference"


DIFFS6 = [0.5, 1.0, 1.5, 2.0, 2.5, -0.2]


@pytest.mark.parametrize(
    "metric, words", [("acc", "better than lstm"), ("ce", "worse than lstm"), ("mse", "worse than lstm")]
)
def test_wilcoxon_from_six_pairs_and_direction_of_the_metric(metric, words):
    base = [0.1 * s for s in range(6)]
    rows = [run("lstm", s, b, metric=metric) for s, b in enumerate(base)]
    rows += [run("cayley", s, b + d, metric=metric) for s, (b, d) in enumerate(zip(base, DIFFS6))]
    r = only(stats.paired_table(frame(rows), "lstm"), method="cayley")
    ref = sps.wilcoxon(np.array(base) + np.array(DIFFS6) - np.array(base))
    assert r["test"] == "Wilcoxon signed-rank" and r["n"] == 6
    assert r["statistic"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    e = stats.mean_ci(DIFFS6)
    assert r["ci_low"] == pytest.approx(e["ci_low"]) and r["ci_low"] > 0
    assert r["verdict"] == words


def test_lower_is_better_negative_difference_is_better():
    rows = [run("lstm", s, 1.0, metric="mse") for s in range(3)]
    rows += [run("cd", s, 1.0 - d, penalty=0.5, metric="mse") for s, d in enumerate([0.30, 0.31, 0.29])]
    r = only(stats.paired_table(frame(rows)), method="cd")
    assert r["ci_high"] < 0 and r["verdict"] == "better than lstm"


def test_identical_pairs_are_called_identical():
    """cd and cdopt compute the same training: every difference is exactly 0."""
    rows = [run("cdopt", s, 0.8 + 0.01 * s, penalty=0.5) for s in range(3)]
    rows += [run("cd", s, 0.8 + 0.01 * s, penalty=0.5) for s in range(3)]
    r = only(stats.paired_table(frame(rows), "cdopt"), method="cd")
    assert r["n"] == 3 and r["ci_low"] == 0 == r["ci_high"]
    assert r["verdict"] == "identical to cdopt in every pair"


def test_single_seed_pairs_get_no_interval_and_no_test():
    rows = [run("lstm", 0, 0.8), run("cd", 0, 0.9, penalty=0.5)]
    r = only(stats.paired_table(frame(rows), "lstm"), method="cd")
    assert r["n"] == 1 and r["mean"] == pytest.approx(0.1)
    assert np.isnan(r["ci_low"]) and np.isnan(r["p_value"]) and r["test"] == ""
    assert r["verdict"] == "n = 1: no interval, no test"


def test_pairing_matches_seeds_and_ignores_method_specific_columns():
    # baseline rows in another seed order; cd differs in every method-specific column
    rows = [run("lstm", s, v) for s, v in [(2, 0.30), (0, 0.10), (1, 0.20)]]
    rows += [run("lstm", s, 0.99, lr=1e-2) for s in range(3)]  # another shared configuration: never a partner
    rows += [
        run(
            "cd",
            s,
            0.10 * s + 0.5,
            penalty=0.5,
            granularity="per_gate",
            lr_constrained=1e-2,
            profile="x",
            perf_iters=50,
        )
        for s in range(3)
    ]
    pairs = stats.pair_runs(frame(rows), "lstm")
    cd = pairs[pairs["method"] == "cd"].sort_values("seed")
    assert list(cd["seed"]) == [0, 1, 2]
    assert list(cd["test_metric_base"]) == pytest.approx([0.10, 0.20, 0.30])
    r = only(stats.paired_table(frame(rows), "lstm"), method="cd", lr=1e-3)
    assert r["mean"] == pytest.approx(0.4) and r["std"] == pytest.approx(0.0)
    assert r["granularity"] == "per_gate" and r["penalty_param"] == 0.5


def test_baseline_recorded_once_per_granularity_pairs_once_per_seed():
    rows = []
    for s in range(3):
        rows.append(run("lstm", s, 0.50, run_id=f"a{s}"))  # smallest run_id: taken
        rows.append(run("lstm", s, 0.55, granularity="per_gate", run_id=f"b{s}"))
        rows.append(run("cd", s, 0.60, penalty=0.5, run_id=f"c{s}"))
        rows.append(run("cd", s, 0.70, penalty=0.5, granularity="per_gate", run_id=f"d{s}"))
    t = stats.paired_table(frame(rows), "lstm")
    assert len(t) == 2 and (t["n"] == 3).all()
    assert only(t, granularity="stacked")["mean"] == pytest.approx(0.10)
    assert only(t, granularity="per_gate")["mean"] == pytest.approx(0.20)
    assert list(t["mean_baseline"]) == pytest.approx([0.50, 0.50])


def test_cdopt_is_paired_at_the_same_penalty_param():
    rows = []
    for s in range(2):
        for p in (0.1, 0.5):
            rows.append(run("cd", s, p + 0.01 * s, penalty=p))
            rows.append(run("cdopt", s, p, penalty=p))
        rows.append(run("lstm", s, 0.0))
        rows.append(run("cayley", s, 0.3))
    t = stats.paired_table(frame(rows), "cdopt", match=stats.METHOD_SPECIFIC)
    assert set(t["method"]) == {"cd"} and sorted(t["penalty_param"]) == [0.1, 0.5]
    assert list(t["mean"]) == pytest.approx([0.005, 0.005]) and (t["n"] == 2).all()
    assert [b for b, _ in stats.baselines(frame(rows))] == ["lstm", "cdopt"]


def test_only_ok_runs_enter_statistics():
    rows = [run("lstm", s, 0.5 + 0.1 * s) for s in range(3)]
    rows += [
        run("cd", 0, 0.9, penalty=0.5),
        run("cd", 1, 0.7, penalty=0.5),
        run("cd", 2, float("nan"), penalty=0.5, status="diverged"),
    ]
    df = frame(rows)
    st = stats.stats_table(df)
    cd = only(st, method="cd", quantity="test_metric")
    assert cd["n"] == 2 and cd["n_runs"] == 3 and cd["mean"] == pytest.approx(0.8)
    r = only(stats.paired_table(df), method="cd")
    assert r["n"] == 2 and r["n_runs"] == 3 and r["mean"] == pytest.approx((0.4 + 0.1) / 2)


def test_old_columns_are_skipped_not_invented():
    df = frame([run("lstm", s, 0.5, feasibility_raw=1.0) for s in range(2)])
    st = stats.stats_table(df)
    assert set(st["quantity"]) == {"test_metric", "feasibility_raw"}
    assert stats.paired_table(df, "lstm", "test_metric_at_best_val").empty
    assert stats.paired_table(df, "nope").empty
    assert set(stats.all_stats(df)["kind"]) == {"mean"}


def test_default_baseline_prefers_the_new_name():
    assert stats.default_baseline(frame([run("lstm", 0, 1), run("unconstrained", 0, 1)])) == "unconstrained"
    assert stats.default_baseline(frame([run("lstm", 0, 1), run("cd", 0, 1, penalty=1)])) == "lstm"
    assert stats.default_baseline(frame([run("cd", 0, 1, penalty=1)])) is None


def test_ratio_table_is_the_per_seed_ratio():
    rows = [run("lstm", s, 0.5, train_samples_per_s=v) for s, v in enumerate([100.0, 200.0])]
    rows += [run("cd", s, 0.5, penalty=0.5, train_samples_per_s=v) for s, v in enumerate([50.0, 200.0])]
    t = stats.ratio_table(frame(rows))
    cd = only(t, method="cd")
    # geometric mean of 0.5 and 1.0; the t interval of log r (t_{0.975,1} = 12.706) mapped back
    half = 12.706204736 * (math.log(2) / math.sqrt(2)) / math.sqrt(2)
    assert (
        cd["mean"] == pytest.approx(math.sqrt(0.5))
        and cd["ci_low"] == pytest.approx(math.sqrt(0.5) * math.exp(-half))
        and cd["ci_high"] == pytest.approx(math.sqrt(0.5) * math.exp(half))
        and cd["min"] == pytest.approx(0.5)
        and cd["max"] == pytest.approx(1.0)
    )
    assert only(t, method="lstm")["mean"] == pytest.approx(1.0)


def test_ratio_interval_stays_positive_and_symmetric_in_the_baseline():
    ratios = [1 / 3, 1.0, 3.0]  # noisy whole-run ratios of packed runs: an arithmetic interval crosses 0
    rows = [run("lstm", s, 0.5, train_samples_per_s=100.0) for s in range(3)]
    rows += [run("cd", s, 0.5, penalty=0.5, train_samples_per_s=100.0 * r) for s, r in enumerate(ratios)]
    cd = only(stats.ratio_table(frame(rows)), method="cd")
    assert cd["ci_low"] > 0 and cd["mean"] == pytest.approx(1.0)
    assert cd["ci_low"] * cd["ci_high"] == pytest.approx(1.0)  # r and 1/r give mirrored intervals


def test_every_runconfig_field_is_a_config_column():
    from bench.runner import RunConfig

    assert {f.name for f in fields(RunConfig)} <= set(stats.CONFIG_COLUMNS)


def hist(rows):
    return pd.DataFrame(rows, columns=["run_id", "kind", "step", "train_wall_s", "val_metric"])


def test_time_to_target_first_logged_evaluation():
    h = hist(
        [
            ("r", "step", 30, 3.0, 0.95),
            ("r", "step", 10, 1.0, 0.50),
            ("r", "step", 15, 1.5, None),
            ("r", "step", 20, 2.0, 0.91),
            ("r", "epoch", 40, 4.0, 0.97),
        ]
    )
    assert stats.time_to_target(h, 0.9, True) == (20, 2.0)
    assert stats.time_to_target(h, 0.96, True) == (40, 4.0)
    assert stats.time_to_target(h, 0.99, True) is None
    assert stats.time_to_target(h, 0.6, False) == (10, 1.0)  # lower is better: 0.50 <= 0.6 at step 10
    assert stats.time_to_target(h, 0.4, False) is None
    assert stats.time_to_target(h.drop(columns="val_metric"), 0.5, True) is None


def test_time_to_target_refuses_several_runs():
    h = hist([("a", "step", 10, 1.0, 0.5), ("b", "step", 10, 1.0, 0.5)])
    with pytest.raises(ValueError, match="one run"):
        stats.time_to_target(h, 0.4, True)
