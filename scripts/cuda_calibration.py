"""Device calibration of the constraint's plumbing (the prepared GPU check of the flat-weight path).

Run on a CUDA machine (``python scripts/cuda_calibration.py --out DIR``); ``--cpu`` runs the same
logic on the CPU with tiny shapes so that it is tested where no GPU is.  Writes
``calibration.json`` in ``--out`` and prints one line per figure:

* ``copy_path``: a plain ``nn.LSTM`` train step with its weights flat (after
  ``flatten_parameters``: cuDNN uses them in place) against the same weights as separate
  tensors (cuDNN allocates, queries the layout and copies every weight on every forward),
  paired (:func:`bench.perf.paired.interleaved_times`): the price of the copy path;
* ``weight_path``: what ``StiefelLSTM`` reports, with cuDNN's "not part of single contiguous
  chunk of memory" warning turned into an error for its forward and backward;
* ``no_sync``: a no-grad and a grad forward of ``StiefelLSTM`` under
  ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only): the host never waits for the device;
* ``kernels``: device kernels launched by one train step of the harness's steps
  (``bench.runner.make_steps``) per method, from ``torch.profiler`` (CPU: the CPU operators).
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from torch import nn

import cdcore
from bench import measure
from bench.perf import paired
from bench.perf.plan import run_config, shape28_task
from bench.runner import make_steps


def copy_path(device: str, hidden: int, batch: int, rounds: int) -> dict:
    """Paired train steps of nn.LSTM with flat vs separate (copied-per-call) weights."""
    torch.manual_seed(0)
    flat = nn.LSTM(28, hidden, num_layers=2, batch_first=True, bidirectional=True).to(device)
    flat.flatten_parameters()
    apart = {n: p.detach().clone().requires_grad_() for n, p in flat.named_parameters()}
    x = torch.rand(batch, 28, 28, device=device)

    def step_flat():
        out, _ = flat(x)
        out.sum().backward()

    def step_apart():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the copy path's own warning, expected here
            out, _ = torch.func.functional_call(flat, apart, (x,))
        out.sum().backward()

    t = paired.interleaved_times(
        {"flat": step_flat, "apart": step_apart}, rounds=rounds, sync=measure.synchronizer(device)
    )
    return {
        "flat_ms": 1e3 * statistics.median(t["flat"]),
        "apart_ms": 1e3 * statistics.median(t["apart"]),
        "added_ms": 1e3 * statistics.median(a - f for a, f in zip(t["apart"], t["flat"])),
    }


def weight_path(device: str, hidden: int, batch: int) -> dict:
    """StiefelLSTM's weight_path; cuDNN's copy-path warning raised as an error."""
    m = cdcore.StiefelLSTM(28, hidden, num_layers=2, batch_first=True, bidirectional=True, penalty_param=0.5)
    m = m.to(device)
    x = torch.rand(batch, 28, 28, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*single contiguous chunk of memory.*")
        out, _, pen = m.forward_with_penalty(x)
        (out.sum() + pen).backward()
        with torch.no_grad():
            m(x)
    return {"weight_path": m.weight_path, "copy_warning": False}


def no_sync(device: str, hidden: int, batch: int) -> dict:
    """Forwards of StiefelLSTM with the host forbidden to wait for the device (CUDA only)."""
    if not device.startswith("cuda"):
        return {"checked": False, "why": "CUDA only"}
    m = cdcore.StiefelLSTM(28, hidden, num_layers=2, batch_first=True, bidirectional=True, penalty_param=0.5)
    m = m.to(device)
    x = torch.rand(batch, 28, 28, device=device)
    m(x)  # first call: layout template, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            m(x)
        out, _, pen = m.forward_with_penalty(x)
        (out.sum() + pen).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"checked": True}


def kernels(device: str, hidden: int, batch: int, methods) -> dict:
    """Kernels (CUDA) or operators (CPU) of one train step per method, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    task = shape28_task(max(batch, 64))
    counts = {}
    for method in methods:
        steps = make_steps(run_config(method, hidden, batch, device), task)
        steps.train()
        steps.train()  # warm-up: allocations, layouts, cuDNN plans
        measure.synchronizer(device)()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            steps.train()
            measure.synchronizer(device)()
        events = prof.events()
        if device.startswith("cuda"):
            n = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        else:
            n = sum(1 for e in events if e.name.startswith("aten::"))
        counts[method] = {"profiler_events": n, "dispatched_kernel_ops": measure.kernel_op_count(steps.train)}
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (tests the script)")
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --cpu to test the script")
    hidden, batch, rounds = (8, 4, 3) if args.cpu else (100, 64, args.rounds)
    methods = ["unconstrained", "cd", "cdopt"]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__}
    for name, fn in [
        ("copy_path", lambda: copy_path(device, hidden, batch, rounds)),
        ("weight_path", lambda: weight_path(device, hidden, batch)),
        ("no_sync", lambda: no_sync(device, hidden, batch)),
        ("kernels", lambda: kernels(device, hidden, batch, methods)),
    ]:
        try:
            result[name] = fn()
        except Exception as e:  # one failing check must not lose the others' figures
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
