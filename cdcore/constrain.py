"""Attaching the constraint-dissolving parametrisation to weights, and model-wide helpers.

Dissolved weights live in one of two places, and every helper here handles both:

* a weight attached with :func:`dissolve` (any module): a
  :class:`cdcore.dissolving.Dissolve` registered through :mod:`torch.nn.utils.parametrize`,
  the raw weight being ``module.parametrizations.<name>.original``;
* a module that owns its dissolved weights and evaluates them itself, in one batched
  operation for all of them (:class:`cdcore.StiefelLSTM`, ``StiefelGRU``, ``StiefelRNN``):
  it subclasses :class:`DissolvedOwner`, the one protocol :func:`quad_penalty`,
  :func:`feasibility` and :func:`dissolved_weights` know about.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import stiefel
from .dissolving import (
    Dissolve,
    check_granularity,
    check_penalty_param,
    compute_dtype,
    dissolve_map,
    from_blocks,
    to_blocks,
)

__all__ = [
    "DissolvedOwner",
    "DissolvedWeight",
    "dissolve",
    "dissolved_weights",
    "feasibility",
    "quad_penalty",
    "weight_feasibility",
]


class DissolvedWeight(NamedTuple):
    """One dissolved weight of a model, as :func:`dissolved_weights` yields it.

    Attributes
    ----------
    name : str
        Qualified name of the weight the module uses (``"rnn.weight_hh_l0"``, ``"fc.weight"``).
    raw : Tensor
        The raw weight W that the optimiser moves; the module uses A(W).
    granularity : {"stacked", "per_gate"}
    penalty_param : float
    """

    name: str
    raw: Tensor
    granularity: str
    penalty_param: float


class DissolvedOwner:
    """Protocol of modules that own dissolved weights outside ``torch.nn.utils.parametrize``.

    Such a module (a mixin of this class and an ``nn.Module``) evaluates A(W) of its weights
    itself, typically all at once.  It implements:

    * :meth:`dissolved`: its dissolved weights (names relative to the module);
    * :meth:`dissolved_penalty`: penalty_param * sum ||W^T W - I||_F^2 over them, recomputed
      from the current raw weights on every call (its own autograd graph), in one batched
      operation.
    """

    def dissolved(self) -> list[DissolvedWeight]:  # pragma: no cover - interface
        raise NotImplementedError

    def dissolved_penalty(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def dissolve(
    module: nn.Module, tensor_name: str = "weight", *, penalty_param: float, granularity: str = "stacked"
) -> nn.Module:
    """Constrain ``module.<tensor_name>`` to St(n, p) by constraint dissolving.

    After the call ``module.<tensor_name>`` is A(W) of the raw parameter W (stored as
    ``module.parametrizations.<tensor_name>.original``), and W is first projected onto
    the manifold (polar factor), where A(W) = W.  Add :func:`quad_penalty` of the model
    to the loss.

    Assigning ``module.<tensor_name>`` afterwards raises ValueError (A has no inverse; see
    :class:`cdcore.dissolving.Dissolve`), and so does ``torch.func.functional_call`` with the
    key ``"<tensor_name>"`` (torch swaps the tensors already swapped back, and the raw weight
    is untouched); pass the raw weight as ``"parametrizations.<tensor_name>.original"``.

    Parameters
    ----------
    module : nn.Module
    tensor_name : str
        A parameter of ``module`` of shape (n, p), n >= p (``"stacked"``), or (k H, H)
        (``"per_gate"``), not already parametrised.
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
        Unknown ``tensor_name``, a tensor already parametrised or already dissolved by its
        module (:class:`DissolvedOwner`), bad shape, ``penalty_param`` or ``granularity``.
    """
    check_penalty_param(penalty_param)
    check_granularity(granularity)
    if isinstance(module, DissolvedOwner) and any(w.name == tensor_name for w in module.dissolved()):
        raise ValueError(f"{type(module).__name__}.{tensor_name} is already dissolved by its module")
    if parametrize.is_parametrized(module, tensor_name):
        raise ValueError(
            f"{type(module).__name__}.{tensor_name} is already parametrised; dissolve a plain parameter"
        )
    weight = getattr(module, tensor_name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {tensor_name!r}")
    to_blocks(weight, granularity)  # shape check, one clear error
    dissolver = Dissolve(penalty_param, granularity)
    parametrize.register_parametrization(module, tensor_name, dissolver)
    dissolver.tensor_name = tensor_name
    return module


def _parametrized(prefix: str, module: nn.Module):
    """(name, raw, Dissolve) for every weight of ``module`` dissolved through parametrize."""
    if not parametrize.is_parametrized(module):
        return
    for tensor_name, plist in module.parametrizations.items():
        for i, p in enumerate(plist):
            if not isinstance(p, Dissolve):
                continue
            name = f"{prefix}.{tensor_name}" if prefix else tensor_name
            if i != 0:
                raise ValueError(
                    f"{name}: Dissolve must be the first parametrisation of its tensor; it is #{i}"
                )
            yield name, plist.original, p


def dissolved_weights(model: nn.Module):
    """Every dissolved weight of ``model``, both kinds (see the module docstring).

    Yields
    ------
    DissolvedWeight
        ``(name, raw, granularity, penalty_param)`` with ``name`` qualified from ``model``.

    Raises
    ------
    ValueError
        A :class:`cdcore.dissolving.Dissolve` that is not the first parametrisation of its
        tensor (its input would not be the raw weight).
    """
    for prefix, mod in model.named_modules():
        if isinstance(mod, DissolvedOwner):
            for w in mod.dissolved():
                yield w._replace(name=f"{prefix}.{w.name}" if prefix else w.name)
        for name, raw, p in _parametrized(prefix, mod):
            yield DissolvedWeight(name, raw, p.granularity, p.penalty_param)


def quad_penalty(model: nn.Module) -> Tensor:
    """Sum over every dissolved weight W of ``penalty_param * ||W^T W - I||_F^2``.

    Recomputed from the current raw weights on every call, with its own autograd graph, so
    it may be called any number of times, before or after forwards, and backpropagated in
    any order (gradient accumulation over micro-batches works).  One batched operation per
    :class:`DissolvedOwner` module, one per weight attached with :func:`dissolve`; the
    gradient 4 penalty_param X C is formed in closed form.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    Tensor
        A 0-dim tensor with autograd history (a zero tensor when nothing is dissolved), in
        float64 for float64 weights and float32 otherwise (also for half-precision weights
        and under autocast), on the device of the weights.
    """
    terms = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, DissolvedOwner):
            terms.append(mod.dissolved_penalty())
        terms.extend(p.penalty(raw) for _, raw, p in _parametrized(prefix, mod))
    if not terms:
        first = next(model.parameters(), None)
        if first is None:
            return torch.zeros(())
        return torch.zeros((), dtype=compute_dtype(first.dtype), device=first.device)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
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
        for name, raw, granularity, _ in dissolved_weights(model):
            effective = from_blocks(dissolve_map(to_blocks(raw, granularity)), granularity)
            out[name] = {
                "raw": weight_feasibility(raw, granularity),
                "effective": weight_feasibility(effective, granularity),
            }
    return out
