r"""Riemannian optimisers on St(n, p) with the Cayley retraction.

``CayleySGD`` and ``CayleyAdam`` follow Li, Fuxin and Todorovic, "Efficient Riemannian
optimization on the Stiefel manifold via the Cayley transform", ICLR 2020
(arXiv:2002.01113), Algorithms 1 and 2: momentum is kept in the tangent space and the
update moves along the Cayley curve.  Where that paper iterates a fixed point on an
n x n skew matrix, these optimisers use the closed-form Cayley retraction in its
Sherman-Morrison-Woodbury form (:func:`cdcore.stiefel.retr_cayley`, Wen & Yin 2013),
so a tall (4H, H) LSTM weight really moves on St(4H, H) at O(n p^2) cost.

Param groups mark Stiefel parameters with ``"stiefel": True`` (and optionally
``"granularity"``: ``"stacked"`` or ``"per_gate"``); every other group gets plain
Adam (``CayleyAdam``, the update of :class:`torch.optim.Adam`) or SGD with momentum
(``CayleySGD``).  Only ``step`` is overridden; parameters are updated in place, so
``nn.LSTM`` keeps its flat weight buffers.  Stiefel parameters of one shape are
updated together in one batched operation.

Per Stiefel step, with Euclidean gradient G at X:

1. ξ = P_X(G) = G - X sym(X^T G)  (Riemannian gradient, embedded metric);
2. momentum m <- β m + ξ (SGD) or m <- β1 m + (1 - β1) ξ, v <- β2 v + (1 - β2) mean(ξ²)
   with one scalar v per matrix (Li et al., Alg. 2; the mean over entries gives ``lr``
   Adam's per-entry scale);
3. X <- R_X(-lr m̂ / (sqrt(v̂) + eps)) (Cayley retraction), then m <- P_X(m)
   (vector transport by projection, Absil, Mahony, Sepulchre 2008, sec. 8.1).

The Cayley retraction keeps X^T X unchanged in exact arithmetic; float rounding
drifts.  Every ``check_every`` steps the feasibility ||X^T X - I||_F of each matrix
is measured (one host synchronisation) and matrices above ``feasibility_tol`` are
re-projected onto the manifold (polar factor); ``state[p]["reprojections"]`` counts it.
A parameter that is not on the manifold at its first step is projected first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import stiefel
from .dissolving import check_granularity, from_blocks, to_blocks

__all__ = ["CayleyAdam", "CayleySGD"]


def _positive(name: str, value, allow_zero: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number; got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return v


class _CayleyBase(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict) -> None:
        _positive("lr", defaults["lr"], allow_zero=False)
        _positive("feasibility_tol", defaults["feasibility_tol"], allow_zero=False)
        if not (isinstance(defaults["check_every"], int) and defaults["check_every"] >= 1):
            raise ValueError(f"check_every must be an integer >= 1; got {defaults['check_every']!r}")
        defaults.setdefault("stiefel", False)
        defaults.setdefault("granularity", "stacked")
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["stiefel"]:
                check_granularity(group["granularity"])
                if group.get("weight_decay", 0):
                    raise ValueError(f"weight_decay must be 0 on a Stiefel group; got {group['weight_decay']!r}")
                for p in group["params"]:
                    to_blocks(p, group["granularity"])  # shape check

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["stiefel"]:
                buckets: dict[tuple, list[Tensor]] = {}
                for p in group["params"]:
                    if p.grad is not None:
                        buckets.setdefault((p.shape, p.dtype, p.device), []).append(p)
                for params in buckets.values():
                    self._stiefel_bucket(group, params)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._euclidean(group, p)
        return loss

    def _stiefel_bucket(self, group: dict, params: list[Tensor]) -> None:
        gran = group["granularity"]
        k = len(params)
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["reprojections"] = 0
                st["momentum"] = torch.zeros_like(p)
                blocks = to_blocks(p, gran)
                st["second_moment"] = p.new_zeros(blocks.shape[:-2])
                if float(stiefel.feasibility(blocks).max()) > group["feasibility_tol"]:
                    p.copy_(from_blocks(stiefel.projx(blocks), gran))
                    st["reprojections"] += 1
        X = to_blocks(torch.stack(params), gran).flatten(0, 1)
        G = to_blocks(torch.stack([p.grad for p in params]), gran).flatten(0, 1)
        M = to_blocks(torch.stack([self.state[p]["momentum"] for p in params]), gran).flatten(0, 1)
        V = torch.stack([self.state[p]["second_moment"] for p in params]).flatten(0, 1)
        t = self.state[params[0]]["step"] + 1
        Y, M, V = self._stiefel_update(group, X, stiefel.proju(X, G), M, V, t)
        check = t % group["check_every"] == 0
        if check:
            feas = stiefel.feasibility(Y)
            bad = feas > group["feasibility_tol"]
            if bool(bad.any()):
                Y = torch.where(bad[:, None, None], stiefel.projx(Y), Y)
                M = stiefel.proju(Y, M)
            bad_per_param = bad.reshape(k, -1).any(dim=1).tolist()
        shape = lambda T: from_blocks(T.reshape(k, -1, *T.shape[-2:]), gran)  # noqa: E731
        for i, p in enumerate(params):
            st = self.state[p]
            p.copy_(shape(Y)[i])
            st["momentum"].copy_(shape(M)[i])
            st["second_moment"].copy_(V.reshape(k, -1)[i].reshape(st["second_moment"].shape))
            st["step"] = t
            if check and bad_per_param[i]:
                st["reprojections"] += 1

    def _stiefel_update(self, group, X, xi, M, V, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def _euclidean(self, group: dict, p: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reprojections(self) -> int:
        """Total number of feasibility-triggered re-projections over all Stiefel parameters."""
        return int(sum(st.get("reprojections", 0) for st in self.state.values()))


class CayleySGD(_CayleyBase):
    r"""SGD with momentum; Stiefel groups move by the Cayley retraction (Li et al. 2020, Alg. 1).

    Parameters
    ----------
    params : iterable of Tensor or dict
        Param groups; ``{"params": [...], "stiefel": True, "granularity": "stacked"}``
        marks parameters of shape (n, p), n >= p (or (k H, H) per gate) as points of
        St(n, p).
    lr : float
        Learning rate (> 0).
    momentum : float
        Heavy-ball coefficient in [0, 1).
    weight_decay : float
        L2 penalty for non-Stiefel groups only.
    feasibility_tol : float
        Re-project a matrix whose ||X^T X - I||_F (measured in float64) exceeds this,
        checked every ``check_every`` steps.  In float32 the Cayley steps drift by
        about 1e-6 per 100 steps at St(400, 100), so the defaults keep feasibility
        below 1e-5.
    check_every : int
        Steps between feasibility checks (each one synchronises with the device).

    Raises
    ------
    ValueError
        Bad hyperparameter, granularity or parameter shape.
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 feasibility_tol: float = 5e-6, check_every: int = 100) -> None:
        if not (0 <= float(momentum) < 1):
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        _positive("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      feasibility_tol=feasibility_tol, check_every=check_every))

    def _stiefel_update(self, group, X, xi, M, V, t):
        M = group["momentum"] * M + xi
        Y = stiefel.retr_cayley(X, -group["lr"] * M)
        return Y, stiefel.proju(Y, M), V

    def _euclidean(self, group, p):
        d = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
        st = self.state[p]
        if group["momentum"]:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = d.clone()
            else:
                buf.mul_(group["momentum"]).add_(d)
            d = buf
        p.add_(d, alpha=-group["lr"])


class CayleyAdam(_CayleyBase):
    r"""Adam; Stiefel groups move by the Cayley retraction (Li et al. 2020, Alg. 2).

    Non-Stiefel groups get exactly the update of :class:`torch.optim.Adam` (Kingma & Ba,
    arXiv:1412.6980, Alg. 1, with L2 ``weight_decay``).

    Parameters
    ----------
    params : iterable of Tensor or dict
        Param groups; ``{"params": [...], "stiefel": True}`` marks Stiefel parameters.
    lr : float
        Learning rate (> 0).
    betas : (float, float)
        Moment coefficients, each in [0, 1).
    eps : float
        Denominator term (> 0).
    weight_decay : float
        L2 penalty for non-Stiefel groups only.
    feasibility_tol, check_every
        As for :class:`CayleySGD`.

    Raises
    ------
    ValueError
        Bad hyperparameter, granularity or parameter shape.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, feasibility_tol: float = 5e-6, check_every: int = 100) -> None:
        if not all(0 <= float(b) < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        _positive("eps", eps, allow_zero=False)
        _positive("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      feasibility_tol=feasibility_tol, check_every=check_every))

    def _stiefel_update(self, group, X, xi, M, V, t):
        b1, b2 = group["betas"]
        M = b1 * M + (1 - b1) * xi
        V = b2 * V + (1 - b2) * xi.square().mean(dim=(-2, -1))
        step = group["lr"] / (1 - b1**t)
        denom = (V / (1 - b2**t)).sqrt() + group["eps"]
        Y = stiefel.retr_cayley(X, -step * M / denom[:, None, None])
        return Y, stiefel.proju(Y, M), V

    def _euclidean(self, group, p):
        b1, b2 = group["betas"]
        g = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))
