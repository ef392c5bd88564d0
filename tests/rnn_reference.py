"""From-scratch references for the Stiefel recurrent modules (shared by their tests).

Nothing here calls cdcore's arithmetic: A(W) and the penalty are written out with plain
torch ops, and the forward is the plain nn module's, so a test comparing against these
checks cdcore, not cdcore against itself.
"""

from __future__ import annotations

import torch
from torch import nn

import cdcore

#: cell name -> (Stiefel class, plain class, gate blocks per recurrent weight)
CELLS = {
    "lstm": (cdcore.StiefelLSTM, nn.LSTM, 4),
    "gru": (cdcore.StiefelGRU, nn.GRU, 3),
    "rnn": (cdcore.StiefelRNN, nn.RNN, 1),
}

#: (cell, granularity) pairs that exist (a vanilla RNN has no gates)
CELL_GRANULARITIES = [
    ("lstm", "stacked"),
    ("lstm", "per_gate"),
    ("gru", "stacked"),
    ("gru", "per_gate"),
    ("rnn", "stacked"),
]


def _blocks(W: torch.Tensor, granularity: str) -> torch.Tensor:
    H = W.shape[-1]
    return W.reshape(-1, H, H) if granularity == "per_gate" else W.unsqueeze(0)


def formula_A(W: torch.Tensor, granularity: str) -> torch.Tensor:
    """A(W) = W (3/2 I - 1/2 W^T W) per block, in float64 for float64 W, float32 otherwise
    (autocast off: the specified precision of the constraint arithmetic)."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    with torch.autocast(W.device.type, enabled=False):
        B = _blocks(W.to(dtype), granularity)
        eye = torch.eye(B.shape[-1], dtype=dtype, device=W.device)
        return (B @ (1.5 * eye - 0.5 * B.transpose(-2, -1) @ B)).reshape(W.shape).to(W.dtype)


def formula_penalty(raws, granularity: str, penalty_param: float) -> torch.Tensor:
    """penalty_param * sum over weights and blocks of ||B^T B - I||_F^2 (autocast off)."""
    total = 0.0
    for W in raws:
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        with torch.autocast(W.device.type, enabled=False):
            B = _blocks(W.to(dtype), granularity)
            eye = torch.eye(B.shape[-1], dtype=dtype, device=W.device)
            total = total + (B.transpose(-2, -1) @ B - eye).square().sum()
    return penalty_param * total


def raw_weight(m: nn.Module, name: str) -> torch.Tensor:
    """The raw recurrent weight W of ``m``.  Also reads the torch-parametrize layout of
    cdbench <= 0.1.0 (``parametrizations.<name>.original``), so that the regression and
    differential tests can be run against that code to show what they catch."""
    plist = getattr(m, "parametrizations", None)
    if plist is not None and name in plist:
        return plist[name].original
    return getattr(m, name)


def plain_twin(m: nn.Module) -> nn.Module:
    """A plain nn module with ``m``'s configuration (weights irrelevant: they are passed in)."""
    plain_cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}[m.mode]
    config = dict(
        input_size=m.input_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        bias=m.bias,
        batch_first=m.batch_first,
        dropout=m.dropout,
        bidirectional=m.bidirectional,
    )
    if plain_cls is nn.RNN:
        config["nonlinearity"] = m.nonlinearity
    ref = raw_weight(m, "weight_hh_l0")
    return plain_cls(**config, dtype=ref.dtype, device=ref.device).train(m.training)


def reference_forward(m, x, hx=None, params: dict | None = None, twin=None):
    """The reference forward of ``m`` and the leaf tensors it differentiates.

    Every weight of ``m`` as the module sees it (``params`` overrides by name) is copied into a
    fresh leaf; the recurrent ones go through :func:`formula_A`; the plain module runs on them
    through ``torch.func.functional_call``.

    Returns
    -------
    out, hidden, leaves
        ``leaves``: {name: leaf tensor} to read gradients from after a backward.
    """
    twin = twin if twin is not None else plain_twin(m)
    leaves, weights = {}, {}
    for name in m._flat_weights_names:
        own = raw_weight(m, name) if name in m.dissolved_names else getattr(m, name)
        w = (params or {}).get(name, own)
        leaf = w.detach().clone().requires_grad_(True)
        leaves[name] = leaf
        weights[name] = formula_A(leaf, m.granularity) if name in m.dissolved_names else leaf
    out, hidden = torch.func.functional_call(twin, weights, (x,) if hx is None else (x, hx))
    return out, hidden, leaves


def perturb(m, scale=0.05, seed=0):
    """Move every recurrent raw weight of ``m`` off the manifold (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in m.dissolved_names:
            w = raw_weight(m, name)
            w.add_(scale * torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device))
