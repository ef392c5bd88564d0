"""What this platform's own ``torch.nn`` recurrent modules can run.

The fused kernels of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` are the platform's: on a CPU,
oneDNN has a bf16 LSTM primitive only on some instruction sets (AVX-512 with bf16 support,
AMX), so on an AVX2-only CPU (or with oneDNN capped, ``ONEDNN_MAX_CPU_ISA=AVX2``) a plain
``nn.LSTM`` under ``torch.autocast("cpu", dtype=torch.bfloat16)`` raises "could not create a
primitive descriptor for the LSTM forward propagation primitive", while GRU and RNN work.
The Stiefel modules (:mod:`cdcore.rnn`) run the same kernels, so they can run a mode exactly
where the plain module can: :func:`autocast_unsupported` says which.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["autocast_unsupported"]

_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@functools.lru_cache(maxsize=None)
def autocast_unsupported(cell: str = "lstm", device_type: str = "cpu", dtype=torch.bfloat16) -> str | None:
    """Why this platform's plain ``nn`` module of ``cell`` cannot run a forward and backward
    under ``torch.autocast(device_type, dtype)``, or None when it can.

    A probe: a 2-unit module, one forward and backward of a (3, 1, 2) float32 input (the caller's random
    stream untouched), run once
    per process (cached; the kernel libraries read their environment, e.g.
    ``ONEDNN_MAX_CPU_ISA``, once per process too).

    Parameters
    ----------
    cell : {"lstm", "gru", "rnn"}
        The module: ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (tanh).
    device_type : str
        The autocast device type ("cpu", "cuda"); the probe runs there.
    dtype : torch.dtype
        The autocast dtype (``torch.bfloat16``, ``torch.float16``).

    Returns
    -------
    str or None
        One line naming the module, the mode and the platform's error (its first sentence),
        e.g. ``"this platform's nn.LSTM cannot run bfloat16 autocast on cpu: could not create a
        primitive descriptor for the LSTM forward propagation primitive"``; None when it runs.

    Raises
    ------
    ValueError
        ``cell`` is not one of lstm, gru, rnn.
    """
    if cell not in _MODULES:
        raise ValueError(f"unknown cell {cell!r}; allowed: {', '.join(_MODULES)}")
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        module = _MODULES[cell](2, 2).to(device_type)
    x = torch.linspace(-1, 1, 6, device=device_type).reshape(3, 1, 2)
    try:
        with torch.autocast(device_type, dtype=dtype):
            out, _ = module(x)
        out.float().sum().backward()
    except RuntimeError as e:
        first = str(e).strip().split(". ")[0].splitlines()[0].rstrip(".")
        name = str(dtype).removeprefix("torch.")
        module_name = _MODULES[cell].__name__
        return f"this platform's nn.{module_name} cannot run {name} autocast on {device_type}: {first}"
    return None
