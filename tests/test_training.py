"""The training loop's records and recipe (issue 12 items 1, 2, 4-6; issue 11 item 3's --amp):
step-level logging without host syncs between logged steps, training time without logging and
evaluation, model selection on the validation set only, time to target, the whole-run
throughput, the schedules, clipping, weight decay, mixed precision and the run_id rule."""

import dataclasses
import math

import pandas as pd
import pytest
import torch

from bench import runner, stats
from bench.methods import METHODS
from bench.runner import RunConfig, build, data_seed, get_task, run_one, start_training, train_epoch
from cdcore.support import autocast_unsupported

SMALL = dict(
    task="digits",
    num_layers=1,
    hidden_size=8,
    bidirectional=False,
    epochs=2,
    batch_size=64,
    lr=2e-2,
    perf_iters=1,
    profile="smoke",
    val_size=360,  # digits' default validation split (what bench.ablate plans without --val-size)
)


def cfg_of(method="cd", **kw):
    pen = 0.5 if METHODS[method].uses_penalty else None
    return RunConfig(**{**SMALL, "method": method, "penalty_param": pen, **kw})


def steps_of(history):
    return [h for h in history if h["kind"] == "step"]


def epochs_of(history):
    return [h for h in history if h["kind"] == "epoch"]


# ---------------------------------------------------------------------------------------------
# --val-size 0: the old trainer, exactly


def reference_run(cfg: RunConfig) -> tuple[list[float], float]:
    """A from-scratch training loop (no logging, no evaluation but the epoch-end test):
    per-epoch mean training loss and the final test metric."""
    task = get_task(cfg, None)
    model, built = build(cfg, task)
    opt = built.optimizer(model)
    losses = []
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(data_seed(cfg, epoch))
        total, n = 0.0, 0
        for x, y in task.train_batches(cfg.batch_size, gen):
            if built.penalty_in_forward:  # the penalty from the forward, as the method declares
                out, pen = model.forward_with_penalty(x)
            else:
                out, pen = model(x), built.penalty() if built.penalty is not None else None
            loss = task.loss(out, y)
            full = loss + pen if pen is not None else loss
            opt.zero_grad(set_to_none=True)
            full.backward()
            opt.step()
            total += float(loss.detach().double()) * x.shape[0]
            n += x.shape[0]
        losses.append(total / n)
    with torch.no_grad():
        x, y = task.test
        acc = float((model(x).argmax(-1) == y).double().mean())
    return losses, acc


@pytest.mark.parametrize("method", ["lstm", "cd", "cayley"])
def test_val_size_zero_trains_exactly_like_a_plain_loop(method):
    cfg = cfg_of(method, val_size=0, log_every=1)  # logging every step changes nothing
    row, hist = run_one(cfg)
    losses, acc = reference_run(cfg)
    assert row["status"] == "ok"
    assert [h["train_loss"] for h in epochs_of(hist)] == pytest.approx(losses, rel=1e-12, abs=0)
    assert row["test_metric"] == pytest.approx(acc, abs=1e-12)
    assert row["val_size"] == 0 and row["val_metric"] is None and row["test_metric_at_best_val"] is None
    assert row["target_value"] is None and row["steps_to_target"] is None
    assert all(h["val_metric"] is None for h in hist)


def test_evaluation_does_not_change_training():
    """With a validation split, evaluating every step or never gives the same training."""
    a, ha = run_one(cfg_of("cd", eval_every=1))
    b, hb = run_one(cfg_of("cd", eval_every=10_000))
    assert [h["train_loss"] for h in epochs_of(ha)] == [h["train_loss"] for h in epochs_of(hb)]
    assert a["test_metric"] == b["test_metric"]
    assert sum(h["val_metric"] is not None for h in steps_of(ha)) == len(steps_of(ha))
    assert sum(h["val_metric"] is not None for h in steps_of(hb)) == 1  # the last step only


# ---------------------------------------------------------------------------------------------
# step rows


def test_step_rows_every_log_every_and_evaluations_every_eval_every():
    cfg = cfg_of("cd", log_every=3, eval_every=5)
    row, hist = run_one(cfg)
    per_epoch = math.ceil(1077 / 64)
    total = 2 * per_epoch
    logged = [h["step"] for h in steps_of(hist)]
    expected = sorted({s for s in range(1, total + 1) if s % 3 == 0 or s % 5 == 0 or s == total})
    assert logged == expected
    evaluated = [h["step"] for h in steps_of(hist) if h["val_metric"] is not None]
    assert evaluated == sorted({s for s in range(5, total + 1, 5)} | {total})
    for h in steps_of(hist):
        assert list(h) == runner.HISTORY_COLUMNS
        assert h["samples"] == 1077 * (h["step"] // per_epoch) + 64 * (h["step"] % per_epoch)
        assert h["penalty"] > 0 and h["feasibility_eff"] < h["feasibility_raw"]
        assert h["epoch"] == 1 + (h["step"] > per_epoch) and h["lr"] == cfg.lr
    walls = [h["train_wall_s"] for h in steps_of(hist)]
    assert walls == sorted(walls) and walls[0] > 0
    ep = epochs_of(hist)
    assert [h["step"] for h in ep] == [per_epoch, total] and all(h["test_metric"] is not None for h in ep)
    assert ep[-1]["val_metric"] == row["val_metric"]  # the last step is evaluated
    assert (row["log_every"], row["eval_every"], row["val_size"]) == (3, 5, 360)


def test_automatic_intervals_give_50_logged_steps_and_10_evaluations():
    for epochs, per_epoch in [(1, 4), (2, 17), (6, 34), (10, 938), (40, 100)]:
        cfg = cfg_of("lstm", epochs=epochs)
        log_every, eval_every = runner.logging_intervals(cfg, per_epoch)
        total = epochs * per_epoch
        assert total // log_every >= min(total, runner.MIN_LOGGED_POINTS)
        assert eval_every <= per_epoch  # at least one evaluation per epoch
        assert total // eval_every >= min(total, runner.EVALUATIONS)
    row, hist = run_one(cfg_of("lstm"))
    assert len(steps_of(hist)) >= 34  # 2 x 17 steps: every step is logged
    assert row["log_every"] == 1 and row["eval_every"] == 3


# ---------------------------------------------------------------------------------------------
# timing: no sync between logged steps, logging and evaluation excluded


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_training_time_excludes_logging_and_evaluation(monkeypatch):
    """A fake clock moves 1 s per optimiser step, 100 s per evaluation and 10 s per
    feasibility computation: the training times are the steps' seconds exactly."""
    clock = Clock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    real_step, real_eval, real_feas = runner.make_train_step, runner.evaluate, runner.feasibility

    def make_train_step(*a, **k):
        step = real_step(*a, **k)

        def timed(x, y):
            clock.now += 1.0
            return step(x, y)

        return timed

    def evaluate(*a, **k):
        clock.now += 100.0
        return real_eval(*a, **k)

    def feasibility(*a, **k):
        clock.now += 10.0
        return real_feas(*a, **k)

    monkeypatch.setattr(runner, "make_train_step", make_train_step)
    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(runner, "feasibility", feasibility)
    monkeypatch.setattr(runner, "measure_throughput", lambda cfg, task: {})
    row, hist = run_one(cfg_of("cd", log_every=2, eval_every=4, target=0.2))
    assert row["status"] == "ok", row["error"]
    for h in steps_of(hist):
        assert h["train_wall_s"] == pytest.approx(float(h["step"]))
    assert [h["epoch_s"] for h in epochs_of(hist)] == pytest.approx([17.0, 17.0])
    assert row["train_s"] == pytest.approx(34.0)
    assert row["train_samples_per_s"] == pytest.approx(2 * 1077 / 34.0)  # samples / training seconds
    assert row["seconds_to_target"] in [h["train_wall_s"] for h in steps_of(hist)]
    assert row["wall_s"] > 1000  # the evaluations did take (fake) time, outside training


def test_no_host_sync_between_logged_steps(monkeypatch):
    """The trainer's Tensor.item() calls (a host sync on CUDA) and its device synchronisations
    happen only at logged steps and epoch ends, never after an unlogged step.  (The optimiser's
    own item() calls read its step counts, CPU tensors: no device sync.)"""
    import sys

    events = []
    real_item, real_step = torch.Tensor.item, runner.make_train_step

    def item(self):
        if sys._getframe(1).f_code.co_filename == runner.__file__:
            events.append("item")
        return real_item(self)

    def make_train_step(*a, **k):
        step = real_step(*a, **k)

        def recorded(x, y):
            out = step(x, y)
            events.append("step")
            return out

        return recorded

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(runner, "make_train_step", make_train_step)
    monkeypatch.setattr(runner.measure, "synchronizer", lambda device: lambda: events.append("sync"))
    tr = start_training(cfg_of("cd", log_every=5, eval_every=5), get_task(cfg_of("cd"), None))
    tr.log_every = tr.eval_every = 5
    events.clear()
    train_epoch(tr)
    steps = [i for i, e in enumerate(events) if e == "step"]
    assert len(steps) == 17
    for n, (i, j) in enumerate(zip(steps, steps[1:]), start=1):
        between = set(events[i + 1 : j])
        assert between == ({"sync", "item"} if n % 5 == 0 else set()), (n, between)


# ---------------------------------------------------------------------------------------------
# model selection and time to target


def test_test_metric_at_best_val_uses_the_weights_of_the_best_validation_step(monkeypatch):
    """Every validation evaluation is recorded with a copy of the weights; the run's best step
    is the first best validation value, and its test metric is that of those weights."""
    seen = []
    real = runner.evaluate

    def evaluate(model, task, device, *a, split="test", **k):
        value = real(model, task, device, *a, split=split, **k)
        if split == "val":
            seen.append((value, {n: t.detach().clone() for n, t in model.state_dict().items()}))
        return value

    monkeypatch.setattr(runner, "evaluate", evaluate)
    cfg = cfg_of("cd", eval_every=2, lr=5e-2)
    row, hist = run_one(cfg)
    values = [v for v, _ in seen]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    assert row["best_val_metric"] == values[best] and row["val_metric"] == values[-1]
    evaluated = [h for h in steps_of(hist) if h["val_metric"] is not None]
    assert row["best_val_step"] == evaluated[best]["step"]
    assert row["best_val_step"] != evaluated[-1]["step"]  # this run peaked before its end
    model, _ = build(cfg, get_task(cfg, None))
    model.load_state_dict(seen[best][1])
    monkeypatch.setattr(runner, "evaluate", real)
    assert row["test_metric_at_best_val"] == real(model, get_task(cfg, None), "cpu")
    assert row["test_metric_at_best_val"] != row["test_metric"]


def test_time_to_target_is_the_first_logged_evaluation_reaching_it():
    row, _ = run_one(cfg_of("lstm", eval_every=2))
    assert row["target_value"] == 0.85  # digits, smoke profile
    row, hist = run_one(cfg_of("lstm", eval_every=2, target=0.4))
    frame = pd.DataFrame(steps_of(hist))
    assert (row["steps_to_target"], row["seconds_to_target"]) == stats.time_to_target(frame, 0.4, True)
    first = next(h for h in steps_of(hist) if h["val_metric"] is not None and h["val_metric"] >= 0.4)
    assert row["steps_to_target"] == first["step"] and row["seconds_to_target"] == first["train_wall_s"]
    assert first["step"] < hist[-1]["step"]  # reached before the end
    never, _ = run_one(cfg_of("lstm", eval_every=2, target=1.01))
    assert never["target_value"] == 1.01 and never["steps_to_target"] is None
    assert never["seconds_to_target"] is None
    custom, _ = run_one(cfg_of("lstm", profile="custom"))
    assert custom["target_value"] is None and custom["steps_to_target"] is None


# ---------------------------------------------------------------------------------------------
# recipe: schedule, clipping, weight decay


def _lrs_per_step(cfg):
    """Learning rate of every parameter group after each optimiser step, over the whole run."""
    tr = start_training(cfg, get_task(cfg, None))
    lrs = [[g["lr"] for g in tr.optimizer.param_groups]]
    real = tr.step_fn

    def step(x, y):
        out = real(x, y)
        lrs.append([g["lr"] for g in tr.optimizer.param_groups])
        return out

    tr.step_fn = step
    while tr.epoch < cfg.epochs:
        train_epoch(tr)
    return lrs, tr


def test_cosine_schedule_steps_every_group_per_optimiser_step():
    cfg = cfg_of("cd", schedule="cosine", lr_constrained=2e-3)
    lrs, tr = _lrs_per_step(cfg)
    total = tr.total_steps
    assert len(lrs) == total + 1
    for t, per_group in enumerate(lrs):
        factor = (1 + math.cos(math.pi * t / total)) / 2
        assert per_group == pytest.approx([cfg.lr * factor, 2e-3 * factor], abs=1e-12)  # both groups
    assert [h["lr"] for h in epochs_of(tr.history)][-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["cd", "cayley"])
def test_onecycle_peaks_at_each_groups_lr(method):
    cfg = cfg_of(method, schedule="onecycle", lr_constrained=4e-3)
    lrs, tr = _lrs_per_step(cfg)
    peaks = [max(lr[g] for lr in lrs) for g in range(2)]
    assert peaks == pytest.approx([cfg.lr, 4e-3], rel=2e-3)  # the peak falls between two steps
    assert all(lr[1] / lr[0] == pytest.approx(4e-3 / cfg.lr) for lr in lrs)  # one schedule, both groups
    assert lrs[0] == pytest.approx([cfg.lr / 25, 4e-3 / 25])  # torch's div_factor
    assert tr.epoch == cfg.epochs  # stepped exactly total_steps times (OneCycleLR refuses more)


@pytest.mark.parametrize("method", ["lstm", "cd", "cayley", "geotorch_cayley"])
def test_onecycle_with_rmsprop_cycles_the_lr_only(method):
    """OneCycleLR cycles ``momentum`` when an optimiser has one: torch's RMSprop (momentum 0) became
    heavy-ball RMSprop with momentum 0.85-0.95, and CayleyRMSprop (none) failed the ``cayley`` run."""
    cfg = cfg_of(method, schedule="onecycle", optimizer="rmsprop")
    lrs, tr = _lrs_per_step(cfg)
    assert tr.epoch == cfg.epochs and lrs[0][0] == pytest.approx(cfg.lr / 25)
    assert all(g.get("momentum", 0) == 0 for g in tr.optimizer.param_groups)
    assert all("betas" not in g for g in tr.optimizer.param_groups)


@pytest.mark.parametrize("method", ["lstm", "cayley", "geotorch_cayley"])
def test_clip_bounds_the_gradient_norm_before_every_optimiser_step(method):
    norms = []
    cfg = cfg_of(method, clip=0.05, epochs=1)
    tr = start_training(cfg, get_task(cfg, None))
    real = tr.optimizer.step

    def step(*a, **k):
        grads = [p.grad for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        return real(*a, **k)

    tr.optimizer.step = step
    train_epoch(tr)
    assert len(norms) == 17 and max(norms) <= 0.05 * (1 + 1e-5)
    unclipped = []
    tr = start_training(dataclasses.replace(cfg, clip=None), get_task(cfg, None))
    real = tr.optimizer.step

    def step2(*a, **k):
        grads = [p.grad for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
        unclipped.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        return real(*a, **k)

    tr.optimizer.step = step2
    train_epoch(tr)
    assert max(unclipped) > 0.05  # the bound above was the clipping's doing


@pytest.mark.parametrize("method", list(METHODS))
def test_weight_decay_never_reaches_a_recurrent_weight(method):
    if not METHODS[method].available():
        pytest.skip(f"{method} needs {METHODS[method].requires}")
    cfg = cfg_of(method, weight_decay=1e-3)
    task = get_task(cfg, None)
    model, built = build(cfg, task)
    opt = runner.make_optimizer(cfg, model, built)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in names.values()}  # every parameter still optimised, once
    for name, p in names.items():
        assert decay[id(p)] == (0 if "weight_hh" in name else 1e-3), (method, name)
    assert any("weight_hh" in n for n in names)
    # without weight decay the optimiser is the method's own, untouched
    model, built = build(cfg, task)
    plain = runner.make_optimizer(dataclasses.replace(cfg, weight_decay=0.0), model, built)
    assert len(plain.param_groups) == len(built.optimizer(model).param_groups)
    row, _ = run_one(dataclasses.replace(cfg, epochs=1))
    assert row["status"] == "ok", row["error"]


def test_checkpoint_resume_with_the_whole_recipe_matches_an_uninterrupted_run(tmp_path):
    cfg = cfg_of("cd", epochs=3, schedule="onecycle", clip=0.5, weight_decay=1e-3, eval_every=4)
    full, full_hist = run_one(cfg, checkpoint_dir=tmp_path / "a")

    def interrupt(done, total, epoch):
        if epoch == 1 and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, checkpoint_dir=tmp_path / "b", progress=interrupt)
    resumed, hist = run_one(cfg, checkpoint_dir=tmp_path / "b")
    assert resumed["resumed_from_epoch"] == 1
    keys = [
        "test_metric",
        "test_metric_at_best_val",
        "best_val_metric",
        "best_val_step",
        "val_metric",
        "steps_to_target",
        "train_loss",
        "feasibility_raw",
    ]
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    strip = lambda h: [(r["kind"], r["step"], r["train_loss"], r["val_metric"], r["lr"]) for r in h]  # noqa: E731
    assert strip(hist) == strip(full_hist)


# ---------------------------------------------------------------------------------------------
# mixed precision


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_autocast_every_method_trains_on_cpu(method):
    if not METHODS[method].available():
        pytest.skip(f"{method} needs {METHODS[method].requires}")
    cfg = cfg_of(method, amp="bf16", hidden_size=16, epochs=3, cell=_bf16_cell())
    row, hist = run_one(cfg)
    assert row["status"] == "ok", row["error"]
    full, _ = run_one(dataclasses.replace(cfg, amp="off"))
    assert row["test_metric"] > 0.6 and abs(row["test_metric"] - full["test_metric"]) < 0.15
    assert epochs_of(hist)[-1]["train_loss"] < epochs_of(hist)[0]["train_loss"] < math.log(10)
    if METHODS[method].constrained:
        assert row["feasibility_eff"] <= METHODS[method].tolerance


def _bf16_cell():
    """The default cell (lstm) where this platform's own nn.LSTM runs bf16 autocast on the CPU,
    else gru (oneDNN has no bf16 LSTM primitive on an AVX2-only CPU; bench.ablate refuses such a
    plan: tests/test_sweep.py), so that the bf16 training path is tested on every CPU."""
    return "lstm" if autocast_unsupported("lstm", "cpu", torch.bfloat16) is None else "gru"


def test_bf16_forward_runs_in_bf16():
    cfg = cfg_of("cd", amp="bf16", cell=_bf16_cell())
    task = get_task(cfg, None)
    model, built = build(cfg, task)
    step = runner.make_train_step(cfg, task, model, built, runner.make_optimizer(cfg, model, built))
    x, y = next(task.train_batches(16, torch.Generator().manual_seed(0)))
    out, loss, pen = step(x, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and pen.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_on_cpu_fails_the_run_cleanly():
    row, hist = run_one(cfg_of("cd", amp="fp16"))
    assert row["status"] == "failed" and hist == []
    assert row["error"] == "ValueError: amp fp16 needs a CUDA device; got device 'cpu' (use bf16 or off)"


def test_grad_scaler_unscales_before_clipping():
    """With a GradScaler the gradients are unscaled before clip_grad_norm_: what the optimiser
    receives is clipped in true units (a CPU scaler stands in for the CUDA one)."""
    cfg = cfg_of("lstm", clip=0.05)
    task = get_task(cfg, None)
    model, built = build(cfg, task)
    opt = runner.make_optimizer(cfg, model, built)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norms = []
    real = opt.step

    def step(*a, **k):
        grads = [p.grad for p in model.parameters()]
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        return real(*a, **k)

    opt.step = step
    train = runner.make_train_step(cfg, task, model, built, opt, scaler=scaler)
    for x, y in task.train_batches(64, torch.Generator().manual_seed(0)):
        train(x, y)
    assert len(norms) > 10 and max(norms) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_on_cuda(amp):
    row, _ = run_one(cfg_of("cd", amp=amp, device="cuda", clip=1.0))
    assert row["status"] == "ok", row["error"]
    assert row["test_metric"] > 0.3 and row["feasibility_eff"] <= METHODS["cd"].tolerance


# ---------------------------------------------------------------------------------------------
# run_id stability


#: RunConfig's fields at 0.1.0: every later field must be in RunConfig.ADDED_FIELDS
FIELDS_0_1_0 = {
    "method",
    "task",
    "seed",
    "num_layers",
    "hidden_size",
    "bidirectional",
    "granularity",
    "penalty_param",
    "epochs",
    "batch_size",
    "lr",
    "lr_constrained",
    "device",
    "profile",
    "train_subset",
    "test_subset",
    "seq_len",
    "perf_iters",
}


def test_run_ids_of_existing_folders_stay_valid():
    # tests/data/smnist-quick-0.1.0/runs.csv (results/reference/smnist-quick at 0.1.0): lstm, seed 0, quick
    old = RunConfig(
        method="lstm",
        task="smnist",
        seed=0,
        num_layers=2,
        hidden_size=100,
        bidirectional=True,
        epochs=2,
        batch_size=64,
        lr=5e-4,
        device="cpu",
        profile="quick",
        train_subset=15000,
        perf_iters=10,
    )
    assert old.run_id == "7afef8dcf3bc"
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert names - FIELDS_0_1_0 == set(RunConfig.ADDED_FIELDS)
    changed = {
        "val_size": 5000,
        "log_every": 7,
        "eval_every": 9,
        "target": 0.9,
        "schedule": "onecycle",
        "clip": 1.0,
        "weight_decay": 1e-4,
        "amp": "bf16",
    }
    ids = {old.run_id}
    for name in RunConfig.ADDED_FIELDS:
        value = changed.get(name)
        if value is None:  # a field added by someone else: any value but its default
            continue
        ids.add(dataclasses.replace(old, **{name: value}).run_id)
    assert len(ids) == 1 + len([n for n in RunConfig.ADDED_FIELDS if n in changed])


class _HeldClock:
    """``time`` for bench.runner whose perf_counter jumps by ``jump`` s at every progress call."""

    def __init__(self, jump):
        import time as real

        self._real, self.jump, self.offset = real, jump, 0.0

    def perf_counter(self):
        return self._real.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("reports", [True, False])
def test_time_held_at_the_gate_is_not_training_time(monkeypatch, reports):
    """A packed run waits at its step boundary while a neighbour times its steps: the progress
    callback returns those seconds and the trainer leaves them out (a fake clock makes each
    wait 1,000 s; the control callback does not report them, and they count)."""
    clock = _HeldClock(1000.0)
    monkeypatch.setattr(runner, "time", clock)

    calls = []

    def progress(done, total, epoch):
        calls.append(done)
        clock.offset += clock.jump
        return clock.jump if reports else None

    row, history = run_one(cfg_of("unconstrained", epochs=1), progress=progress)
    assert row["status"] == "ok"
    assert len(calls) > 1
    if reports:
        assert row["train_s"] < 1000.0 and row["train_samples_per_s"] > 1.0
        assert all(h["train_wall_s"] < 1000.0 for h in history if h.get("train_wall_s") is not None)
    else:
        assert row["train_s"] >= 1000.0 * len(calls)
