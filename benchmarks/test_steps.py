"""pytest-benchmark micro-benchmarks: one training step and one eval forward per case.

The cases (method x hidden x batch x device, with their rounds) come from
:func:`bench.perf.plan.load_plan`.  Each case builds a fresh model with
:func:`bench.runner.make_steps` (the batch is already on the device, so data loading is
not timed) and times

* ``Steps.train``: forward, loss (+ penalty), backward, optimiser step;
* ``Steps.eval``: a no-grad forward in eval mode,

with ``benchmark.pedantic(step, setup=sync, rounds=R, iterations=1, warmup_rounds=W)``:
the ``W`` warm-up rounds are run and discarded, and every round times exactly one call.
On CUDA the timed function ends with ``torch.cuda.synchronize()`` (kernels are
asynchronous: without it the clock would stop when the work was queued, not done), and
``setup`` synchronises before each round so no earlier work spills into the timing.
On CPU both are no-ops.  For every method but ``unconstrained``, ``setup`` also times one step
of ``unconstrained`` of the same shape (outside the method's timing) and stores these times in
``extra_info["reference_round_s"]``: round i of the method is paired with the unconstrained step
just before it, which makes ``paired_vs_unconstrained`` robust to the machine's speed drifting between
benchmarks.  After the timing, one more step is run under :func:`bench.measure.count_kernel_ops`
(``extra_info["kernel_ops"]``, the table's ``kernel_ops`` column).
"""

import pytest
import torch

from bench import measure
from bench.methods import METHODS
from bench.perf import plan
from bench.perf.run import timed_step
from bench.runner import make_steps


def _bench(benchmark, task_for, case):
    if not METHODS[case["method"]].available():
        pytest.skip(f"{case['method']} needs {METHODS[case['method']].requires}")
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = plan.run_config(case["method"], case["hidden"], case["batch"], case["device"])
    steps = make_steps(cfg, task_for(case["batch"]))
    sync = measure.synchronizer(case["device"])
    ref_times = []
    if case["method"] == plan.REFERENCE:
        setup = sync
    else:
        # the same step of the unconstrained method, timed right before each round: the pair cancels
        # drifts of the machine's speed between benchmarks (report.load_results -> paired_vs_unconstrained)
        ref_cfg = plan.run_config(plan.REFERENCE, case["hidden"], case["batch"], case["device"])
        ref_step = getattr(make_steps(ref_cfg, task_for(case["batch"])), case["kind"])

        def setup():
            ref_times.append(measure.time_fn(ref_step, warmup=0, iters=1, sync=sync).seconds_per_iter)

    benchmark.group = f"{case['kind']} {case['device']} H{case['hidden']} B{case['batch']}"
    benchmark.extra_info.update(
        {k: case[k] for k in ("method", "device", "hidden", "batch", "kind", "warmup")},
        samples=steps.batch_size,
        torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(
        timed_step(getattr(steps, case["kind"]), case["device"]),
        setup=setup,
        rounds=case["rounds"],
        warmup_rounds=case["warmup"],
        iterations=1,
    )
    if ref_times:
        # setup also ran before the warm-up rounds: keep the last `rounds` times
        benchmark.extra_info["reference_round_s"] = ref_times[-case["rounds"] :]
    # kernel-launching operators of one step (deterministic; counted after the timing, untimed)
    benchmark.extra_info["kernel_ops"] = measure.kernel_op_count(getattr(steps, case["kind"]), warmup=0)


@pytest.mark.parametrize("case", plan.load_plan("train"), ids=plan.case_id)
def test_train_step(benchmark, task_for, case):
    _bench(benchmark, task_for, case)


@pytest.mark.parametrize("case", plan.load_plan("eval"), ids=plan.case_id)
def test_eval_step(benchmark, task_for, case):
    _bench(benchmark, task_for, case)
