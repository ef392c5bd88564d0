"""Paired step times of unconstrained / cd / cdopt for the tree on PYTHONPATH (old or new):
per round t_method - t_unconstrained and t_unconstrained / t_method; medians printed as JSON."""

import json
import statistics
import sys

import torch

import bench.perf.plan as plan
from bench.perf.run import time_methods

hidden, batch, rounds, kind, label = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
    sys.argv[5],
)
plan.SEQ_LEN = int(sys.argv[6]) if len(sys.argv) > 6 else plan.SEQ_LEN  # the time steps of the synthetic task
methods = ["unconstrained", "cd", "cdopt"]
t = time_methods(methods, hidden, batch, "cpu", rounds=rounds, warmup=5, kind=kind)
out = {
    "tree": label,
    "hidden": hidden,
    "batch": batch,
    "kind": kind,
    "seq_len": plan.SEQ_LEN,
    "rounds": rounds,
    "threads": torch.get_num_threads(),
}
for m in methods:
    out[f"{m}_median_ms"] = 1e3 * statistics.median(t[m])
for m in ("cd", "cdopt"):
    out[f"{m}_added_ms"] = 1e3 * statistics.median(a - b for a, b in zip(t[m], t["unconstrained"]))
    out[f"{m}_vs_unconstrained"] = statistics.median(b / a for a, b in zip(t[m], t["unconstrained"]))
out["cd_vs_cdopt"] = statistics.median(c / a for a, c in zip(t["cd"], t["cdopt"]))
print(json.dumps(out), flush=True)
