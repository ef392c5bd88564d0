"""Tests of the measurement code (bench.measure, bench.runner.measure_throughput,
bench.perf) that do not depend on the machine's speed: fake clocks, recorded events."""

import csv
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import measure, runner
from bench.perf import cli, paired, plan, report
from bench.perf.run import time_methods, timed_step

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that only moves when told to: ``advance(dt)``; every read is logged."""

    def __init__(self, events):
        self.now, self.events = 0.0, events

    def advance(self, dt):
        self.now += dt

    def __call__(self):
        self.events.append("clock")
        return self.now


@pytest.mark.parametrize("warmup,iters", [(0, 1), (3, 4), (5, 10)])
def test_time_fn_excludes_warmup_and_syncs_before_each_clock_read(warmup, iters):
    events = []
    clock = FakeClock(events)

    def fn():
        events.append("call")
        clock.advance(1.0 if events.count("clock") else 100.0)  # warm-up calls are slow

    t = measure.time_fn(fn, warmup=warmup, iters=iters, sync=lambda: events.append("sync"), clock=clock)
    assert events == ["call"] * warmup + ["sync", "clock"] + ["call"] * iters + ["sync", "clock"]
    assert t.seconds_per_iter == 1.0  # the mean covers exactly the `iters` timed calls
    assert (t.iters, t.warmup) == (iters, warmup)
    assert t.per_s == 1.0


@pytest.mark.parametrize("iters,warmup", [(0, 3), (-1, 0), (5, -1)])
def test_time_fn_rejects_bad_counts(iters, warmup):
    with pytest.raises(ValueError):
        measure.time_fn(lambda: None, warmup=warmup, iters=iters)


def test_synchronizer_cpu_is_noop_and_cuda_calls_cuda_synchronize(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(a))
    assert measure.synchronizer("cpu")() is None
    assert calls == []
    measure.synchronizer("cuda")()  # no GPU needed: torch.cuda.synchronize is replaced
    assert len(calls) == 1 and torch.device(calls[0][0]).type == "cuda"


def test_timed_step_syncs_after_the_step(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))
    timed_step(lambda: events.append("step"), "cuda")()
    assert events == ["step", "sync"]
    events.clear()
    timed_step(lambda: events.append("step"), "cpu")()
    assert events == ["step"]


def _fake_steps(clock, constraint_s, rest_s, batch=32):
    """A train step made of a constraint part and an LSTM part with known durations."""
    constraint = functools.partial(clock.advance, constraint_s)
    rest = functools.partial(clock.advance, rest_s)

    def train():
        constraint()
        rest()

    return runner.Steps(train=train, eval=rest, constraint=constraint, batch_size=batch), rest


@pytest.mark.parametrize("constraint_s,rest_s", [(0.25, 0.75), (3e-3, 7e-2), (2.0, 1e-3)])
def test_time_fn_composition_split_adds_up(constraint_s, rest_s):
    clock = FakeClock([])
    steps, rest = _fake_steps(clock, constraint_s, rest_s)
    timed = {
        name: measure.time_fn(fn, warmup=2, iters=5, clock=clock).seconds_per_iter
        for name, fn in [("train", steps.train), ("constraint", steps.constraint), ("rest", rest)]
    }
    share = timed["constraint"] / timed["train"]
    assert share == pytest.approx(constraint_s / (constraint_s + rest_s))
    assert share + timed["rest"] / timed["train"] == pytest.approx(1.0, abs=1e-9)


def test_measure_throughput_pairs_the_step_with_the_baseline_step(monkeypatch):
    """measure_throughput with make_steps and the clock replaced: the method's step (0.2 s of
    constraint + 0.6 s) is timed interleaved with the unconstrained method's step (0.4 s) of
    the same configuration; the figures are the known ones, the baseline built from ``cfg``
    with only the method (and penalty_param) changed."""
    clock = FakeClock([])
    constraint_s, rest_s, base_s, batch = 0.2, 0.6, 0.4, 16
    steps, rest = _fake_steps(clock, constraint_s, rest_s, batch)
    base_steps, _ = _fake_steps(clock, 0.0, base_s, batch)
    built = []

    def fake_make_steps(cfg, task):
        built.append(cfg)
        return base_steps if cfg.method == runner.baseline_method() else steps

    monkeypatch.setattr(runner, "make_steps", fake_make_steps)
    cfg = runner.RunConfig(method="cd", penalty_param=0.5, perf_iters=4, hidden_size=7, amp="bf16")
    out = runner.measure_throughput(cfg, task=None, warmup=2, clock=clock)
    assert built[0] == cfg and built[1] == runner.dataclasses.replace(
        cfg, method=runner.baseline_method(), penalty_param=None
    )
    assert out["constraint_share"] == pytest.approx(constraint_s / (constraint_s + rest_s))
    assert out["step_samples_per_s"] == pytest.approx(batch / (constraint_s + rest_s))
    assert out["train_step_ms"] == pytest.approx(1e3 * (constraint_s + rest_s))
    assert out["step_vs_baseline"] == pytest.approx(base_s / (constraint_s + rest_s))
    assert out["eval_samples_per_s"] == pytest.approx(batch / rest_s)
    # the baseline method itself: no pairing, ratio 1
    built.clear()
    own = runner.measure_throughput(
        runner.RunConfig(method=runner.baseline_method(), perf_iters=3), task=None, warmup=1, clock=clock
    )
    assert len(built) == 1 and own["step_vs_baseline"] == 1.0
    assert own["step_samples_per_s"] == pytest.approx(batch / base_s)


def test_peak_memory_positive_on_cpu():
    measure.reset_peak_memory("cpu")
    assert measure.peak_memory_mb("cpu") > 0
    assert measure.cpu_count() >= 1


def test_rounds_budget():
    assert plan.rounds_for(0.1, 3, 5, 30.0) == (3, 5)
    assert plan.rounds_for(0.1, 3, 5, None) == (3, 5)
    assert plan.rounds_for(10.0, 3, 5, 30.0) == (1, 2)
    assert plan.rounds_for(100.0, 3, 5, 30.0) == (1, 1)  # a slow benchmark still runs once

    def cost(method, hidden, batch, device):  # what measure_cost would have measured
        step = {"unconstrained": 0.01, "geotorch_expm": 8.0}[method]
        return {"build": 0.5, "train": step, "eval": step / 3}

    cases = plan.make_plan(["unconstrained", "geotorch_expm"], [512], [64], ["cpu"], cost=cost)
    slow = {(c["method"], c["kind"]): c for c in cases}
    assert not slow[("unconstrained", "eval")]["cut"] and slow[("geotorch_expm", "train")]["cut"]
    # one round of a method also times the reference step it is paired with
    assert slow[("geotorch_expm", "train")]["est_step_s"] == pytest.approx(8.01)
    assert slow[("unconstrained", "train")]["est_s"] == pytest.approx(0.5 + 8 * 0.01)
    assert all(c["rounds"] >= 1 and c["warmup"] >= 0 for c in cases)
    # without a cost: default rounds, no estimate (what pytest benchmarks/ collects)
    assert all(
        c["est_s"] is None and not c["cut"] for c in plan.make_plan(["cd"], [8], [4], ["cpu"], cost=None)
    )


def test_cost_estimate_is_measured_so_a_new_method_is_estimated_too(monkeypatch):
    """The estimate times a real warm-up step: a method unknown to any table (here one whose
    optimiser step sleeps 50 ms) is estimated at least that slow, and its rounds are cut."""
    import time

    from bench import methods

    def slow_build(lstm, cfg):
        built = methods.build_unconstrained(lstm, cfg)
        make = built.optimizer

        def optimizer(model):
            opt = make(model)
            step = opt.step

            def sleepy_step(*a, **k):
                time.sleep(0.05)
                return step(*a, **k)

            opt.step = sleepy_step
            return opt

        built.optimizer = optimizer
        return built

    monkeypatch.setitem(methods.METHODS, "slowpoke", methods.Method("slowpoke", "", "", slow_build))
    cost = plan.measure_cost("slowpoke", 8, 4, "cpu")
    assert cost["train"] >= 0.05 and cost["build"] > 0 and cost["eval"] > 0
    cases = plan.make_plan(["slowpoke"], [8], [4], ["cpu"], max_seconds=0.2)
    train = next(c for c in cases if c["kind"] == "train")
    assert train["est_step_s"] >= 0.05 and train["cut"] and train["warmup"] == 1 and train["rounds"] <= 3


def test_shape28_task_has_the_notebooks_shape():
    task = plan.shape28_task(8)
    x, y = task.train
    assert x.shape == (8, 28, 28) and y.shape == (8,) and task.output_size == 10 and task.seq_len == 28
    cfg = plan.run_config("cd", 64, 8, "cpu")
    assert (cfg.num_layers, cfg.bidirectional, cfg.penalty_param) == (2, True, 0.5)
    assert plan.run_config("unconstrained", 64, 8, "cpu").penalty_param is None
    assert plan.run_config("lstm", 64, 8, "cpu") == plan.run_config("unconstrained", 64, 8, "cpu")  # alias


def test_perf_cli_end_to_end(tmp_path):
    out = tmp_path / "perf"
    cmd = [
        sys.executable,
        "-m",
        "bench.perf",
        "--quick",
        "--methods",
        "lstm",  # the old name of unconstrained: an alias
        "cd",
        "--hidden",
        "16",
        "--batch",
        "8",
        "--rounds",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in [
        "table.csv",
        "table.md",
        "relative_throughput.png",
        "scaling.png",
        "command.txt",
        "plan.json",
    ]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["method"], r["kind"]) for r in rows} == {
        (m, k) for m in ("unconstrained", "cd") for k in ("train", "eval")
    }
    assert all((r["hidden"], r["batch"], r["rounds"]) == ("16", "8", "1") for r in rows)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["samples_per_s"]) > 0
        if r["method"] == "unconstrained":
            assert float(r["ratio_to_unconstrained"]) == 1.0 == float(r["paired_vs_unconstrained"])
        else:
            assert float(r["ratio_to_unconstrained"]) > 0 and float(r["paired_vs_unconstrained"]) > 0
    assert "ratio_to_unconstrained" in (out / "table.md").read_text()
    bench = json.loads((out / "benchmark.json").read_text())["benchmarks"]
    cd = [b for b in bench if b["extra_info"]["method"] == "cd"]
    assert cd and all(len(b["extra_info"]["reference_round_s"]) == len(b["stats"]["data"]) == 1 for b in cd)
    assert all(c["est_s"] > 0 for c in json.loads((out / "plan.json").read_text()))  # measured estimates
    command = (out / "command.txt").read_text()
    assert "python -m bench.perf --quick --methods lstm cd --hidden 16 --batch 8 --rounds 1" in command
    for key in ("torch:", "cpu count:", "date:", "estimated:"):
        assert key in command


class _Clock:
    """A clock that moves only when a fake step advances it."""

    def __init__(self):
        self.t = 0.0

    def advance(self, dt):
        self.t += dt

    def __call__(self):
        return self.t


def test_interleaved_times_pairs_rounds_and_shuffles_the_order():
    clock, calls = _Clock(), []

    def step(name, cost):
        def fn():
            calls.append(name)
            clock.advance(cost)

        return fn

    fns = {"lstm": step("lstm", 1.0), "cd": step("cd", 1.25), "cdopt": step("cdopt", 2.0)}
    times = paired.interleaved_times(fns, rounds=6, warmup=2, clock=clock, seed=3)
    assert calls[:6] == ["lstm"] * 2 + ["cd"] * 2 + ["cdopt"] * 2  # warm-up first, untimed
    rounds = [calls[6 + 3 * i : 9 + 3 * i] for i in range(6)]
    assert all(sorted(r) == ["cd", "cdopt", "lstm"] for r in rounds)  # one call of each per round
    assert len({tuple(r) for r in rounds}) > 1  # in a shuffled order
    assert times == {"lstm": [1.0] * 6, "cd": [1.25] * 6, "cdopt": [2.0] * 6}
    rows = {r["method"]: r for r in paired.relative_rows(times, "lstm", hidden=8)}
    assert rows["cd"]["ratio"] == pytest.approx(0.8) and rows["cd"]["of_medians"] == pytest.approx(0.8)
    assert rows["cd"]["median_ms"] == pytest.approx(1250.0) and rows["cd"]["rounds"] == 6
    assert rows["lstm"]["ratio"] == 1.0 and rows["cdopt"]["hidden"] == 8
    with pytest.raises(ValueError):
        paired.interleaved_times(fns, rounds=0)


def test_time_methods_builds_each_method_and_times_it_interleaved(monkeypatch):
    clock = _Clock()
    costs = {"unconstrained": 1.0, "cd": 1.25}

    class FakeSteps:
        def __init__(self, cost):
            self.train = self.eval = lambda: clock.advance(cost)

    monkeypatch.setattr("bench.perf.run.make_steps", lambda cfg, task: FakeSteps(costs[cfg.method]))
    times = time_methods(["unconstrained", "cd"], 8, 4, "cpu", rounds=5, warmup=1, clock=clock)
    assert times == {"unconstrained": [1.0] * 5, "cd": [1.25] * 5}


def test_pairwise_ratios_are_taken_within_rounds():
    # the machine halves its speed after round 2: per-round ratios stay exact,
    # the ratio of medians is what the drift leaves of it
    times = {
        "lstm": [1.0, 1.0, 2.0, 2.0, 2.0],
        "cd": [1.1, 1.1, 2.2, 2.2, 2.2],
        "cdopt": [1.2, 1.2, 2.4, 2.4, 2.4],
    }
    rows = {(r["method"], r["baseline"]): r for r in paired.pairwise_rows(times, hidden=8)}
    assert len(rows) == 6 and rows["cd", "cdopt"]["hidden"] == 8
    assert rows["cd", "cdopt"]["ratio"] == pytest.approx(1.2 / 1.1)
    assert rows["cdopt", "cd"]["ratio"] == pytest.approx(1.1 / 1.2)
    assert rows["cd", "lstm"]["q1"] == pytest.approx(1 / 1.1) == rows["cd", "lstm"]["q3"]
    assert rows["cd", "lstm"]["of_medians"] == pytest.approx(1 / 1.1)


@pytest.mark.parametrize(
    "reference, key",
    [("unconstrained", "reference_round_s"), ("lstm", "lstm_round_s")],  # today's files; before 0.2
    ids=["current", "written-before-the-rename"],
)
def test_load_results_pairs_each_round_with_the_reference_step_before_it(tmp_path, reference, key):
    def bm(method, data, ref=None):
        info = dict(method=method, device="cpu", hidden=8, batch=4, kind="train", warmup=0, samples=4)
        if ref is not None:
            info[key] = ref
        return {
            "extra_info": info,
            "stats": {"median": sorted(data)[len(data) // 2], "rounds": len(data), "data": data},
        }

    # the reference was timed while the machine was fast; cd's benchmark ran while it was twice as slow
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    bm(reference, [1.0, 1.0, 1.0]),
                    bm("cd", [2.2, 2.2, 2.2], ref=[2.0, 2.0, 2.0]),
                    bm("cdopt", [1.2, 1.2, 1.2]),
                ]
            }
        )
    )
    df = report.load_results(path).set_index("method")
    assert df.loc["cd", "ratio_to_unconstrained"] == pytest.approx(2.2)  # unpaired: the drift shows
    assert df.loc["cd", "paired_vs_unconstrained"] == pytest.approx(2.0 / 2.2)  # paired: it cancels
    assert df.loc["unconstrained", "paired_vs_unconstrained"] == 1.0  # an old file's lstm row, renamed
    assert math.isnan(df.loc["cdopt", "paired_vs_unconstrained"])  # no reference timings: not claimed
    report.plot_relative(df.reset_index(), tmp_path / "rel.png")
    report.plot_scaling(df.reset_index(), tmp_path / "scaling.png")
    assert (tmp_path / "rel.png").stat().st_size > 0 and (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, named",
    [
        (["--hidden", "0"], "hidden must be a positive integer; got '0'"),
        (["--methods", "nosuch"], "unknown method 'nosuch'; allowed: unconstrained, cd"),
        (["--rounds", "0"], "rounds must be a positive integer; got '0'"),
        (["--warmup", "-1"], "warmup must be a non-negative integer; got '-1'"),
        (["--out", "/proc/cdbench"], "/proc/cdbench"),
    ],
)
def test_perf_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--quick", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bench.perf: error:") and named in lines[0]
    assert "Traceback" not in err and not (tmp_path / "results").exists()


def test_perf_paired_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert (
        cli.main(
            [
                "--paired",
                "--methods",
                "cd",
                "--hidden",
                "16",
                "--batch",
                "8",
                "--dry-run",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "unconstrained, cd x hidden 16 x batch 8" in out and "estimate" in out
    assert not (tmp_path / "p").exists()
