"""Attaching the constraint-dissolving parametrisation to weights, and model-wide helpers.

``dissolve`` is a one-line call in the manner of ``geotorch.orthogonal``: it registers
:class:`cdcore.dissolving.Dissolve` through :mod:`torch.nn.utils.parametrize`.
``quad_penalty`` and ``feasibility`` walk a model and find every dissolved weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import stiefel
from .dissolving import Dissolve, check_granularity, check_penalty_param, to_blocks

__all__ = ["dissolve", "dissolved_weights", "feasibility", "quad_penalty", "weight_feasibility"]


def dissolve(
    module: nn.Module, tensor_name: str = "weight", *, penalty_param: float, granularity: str = "stacked"
) -> nn.Module:
    """Constrain ``module.<tensor_name>`` to St(n, p) by constraint dissolving.

    After the call ``module.<tensor_name>`` is A(W) of the raw parameter W (stored as
    ``module.parametrizations.<tensor_name>.original``), and W is first projected onto
    the manifold (polar factor), where A(W) = W.  Add :func:`quad_penalty` of the model
    to the loss.

    Parameters
    ----------
    module : nn.Module
    tensor_name : str
        A parameter of ``module`` of shape (n, p), n >= p (``"stacked"``), or (k H, H)
        (``"per_gate"``).
    penalty_param : float
        Finite, >= 0 (0 warns).  The loss term is penalty_param * ||W^T W - I||_F^2.
    granularity : {"stacked", "per_gate"}

    Returns
    -------
    nn.Module
        ``module`` itself, parametrised.

    Raises
    ------
    ValueError
        Unknown ``tensor_name``, bad shape, ``penalty_param`` or ``granularity``.
    """
    check_penalty_param(penalty_param)
    check_granularity(granularity)
    weight = getattr(module, tensor_name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {tensor_name!r}")
    to_blocks(weight, granularity)  # shape check, one clear error
    parametrize.register_parametrization(module, tensor_name, Dissolve(penalty_param, granularity))
    return module


def dissolved_weights(model: nn.Module):
    """Yield ``(qualified_name, owner, tensor_name, Dissolve)`` for every dissolved weight of ``model``."""
    for prefix, mod in model.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for tensor_name, plist in mod.parametrizations.items():
            for p in plist:
                if isinstance(p, Dissolve):
                    yield (f"{prefix}.{tensor_name}" if prefix else tensor_name), mod, tensor_name, p


def quad_penalty(model: nn.Module) -> Tensor:
    """Sum over every dissolved weight W of ``penalty_param * ||W^T W - I||_F^2``.

    Modules that compute their penalty with their forward (e.g.
    :class:`cdcore.StiefelLSTM`, which shares W^T W with A(W)) provide a method
    ``dissolved_penalty()``; it is used for the weights they own.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    Tensor
        A 0-dim tensor with autograd history (a zero tensor when nothing is dissolved),
        dtype and device of the first parameter.
    """
    total = None
    batched = {id(m) for m in model.modules() if hasattr(m, "dissolved_penalty")}
    for m in model.modules():
        if id(m) in batched:
            term = m.dissolved_penalty()
            total = term if total is None else total + term
    for _, owner, tensor_name, p in dissolved_weights(model):
        if id(owner) in batched:
            continue
        term = p.penalty(owner.parametrizations[tensor_name].original)
        total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        total = torch.zeros((), dtype=first.dtype if first is not None else None,
                            device=first.device if first is not None else None)
    return total


def weight_feasibility(W: Tensor, granularity: str = "stacked") -> float:
    """||C(W)||_F of one weight against its granularity.

    For ``"stacked"`` this is ||W^T W - I||_F on St(kH, H); for ``"per_gate"`` it is
    the norm of the whole constraint map, sqrt(sum over gate blocks of ||B^T B - I||_F^2),
    so that the penalty is always ``penalty_param * weight_feasibility(W)**2``.

    Parameters
    ----------
    W : Tensor, shape (n, p) or (k H, H)
    granularity : {"stacked", "per_gate"}

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Bad shape or granularity.
    """
    with torch.no_grad():
        blocks = to_blocks(W.detach(), granularity).double()
        return float(torch.linalg.vector_norm(stiefel.feasibility(blocks)))


def feasibility(model: nn.Module) -> dict[str, dict[str, float]]:
    """Feasibility of every dissolved weight of ``model``.

    Returns
    -------
    dict
        ``{qualified_name: {"raw": ||C(W)||_F, "effective": ||C(A(W))||_F}}`` where W is
        the raw parameter and A(W) the weight that the forward uses, both measured
        against the weight's own granularity (:func:`weight_feasibility`).
    """
    out = {}
    with torch.no_grad():
        for name, owner, tensor_name, p in dissolved_weights(model):
            raw = owner.parametrizations[tensor_name].original
            out[name] = {
                "raw": weight_feasibility(raw, p.granularity),
                "effective": weight_feasibility(p(raw), p.granularity),
            }
    return out
