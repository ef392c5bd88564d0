r"""The constraint-dissolving map and penalty of CDOpt for St(n, p).

Minimising f over St(n, p) is replaced by the unconstrained minimisation of

.. math::
    h(X) = f(A(X)) + \mathrm{penalty\_param}\,\lVert X^T X - I_p \rVert_F^2,
    \qquad A(X) = X \left(\tfrac32 I_p - \tfrac12 X^T X\right),

whose first- and second-order stationary points near the manifold are those of the
constrained problem once ``penalty_param`` is large enough.  ``penalty_param`` is
CDOpt's name: the papers below write the penalty term as (beta / 2) ||X^T X - I||_F^2,
so penalty_param = beta / 2 (CDOpt 0.5.5 ``stiefel_torch.generate_cdf_fun`` computes
``obj(A(X)) + beta/2 * sum(C(X)**2)``; its ``nn`` layers take ``penalty_param`` directly).

References
----------
.. [XLT22] N. Xiao, X. Liu, K.-C. Toh, "Dissolving constraints for Riemannian
   optimization", Math. Oper. Res. (2024), arXiv:2203.10319: the constraint-dissolving
   function (CDF) and its map A for the Stiefel manifold.
.. [HXLT22] X. Hu, N. Xiao, X. Liu, K.-C. Toh, "A constraint dissolving approach for
   nonsmooth optimization over the Stiefel manifold", arXiv:2205.10500: the same A and
   penalised function; CDOpt 0.5.5 ``stiefel_torch.A`` and ``C_quad_penalty`` implement
   exactly these formulas (checked against them in the tests).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from . import stiefel

__all__ = [
    "GRANULARITIES",
    "Dissolve",
    "check_granularity",
    "check_penalty_param",
    "dissolve_map",
    "dissolve_vjp",
    "dissolve_with_penalty",
    "from_blocks",
    "project",
    "quad_penalty_value",
    "to_blocks",
]

GRANULARITIES = ("stacked", "per_gate")


def check_granularity(granularity: str) -> str:
    """Return ``granularity`` if it is one of :data:`GRANULARITIES`, else raise ValueError."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    return granularity


def check_penalty_param(penalty_param: float) -> float:
    """Return ``penalty_param`` as a float if finite and >= 0, else raise ValueError."""
    try:
        value = float(penalty_param)
    except (TypeError, ValueError):
        raise ValueError(f"penalty_param must be a finite number >= 0; got {penalty_param!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"penalty_param must be a finite number >= 0; got {penalty_param!r}")
    return value


def to_blocks(W: Tensor, granularity: str) -> Tensor:
    r"""View a weight as the batch of matrices that the constraint applies to.

    ``"stacked"``: the whole (k H, H) weight is one point of St(k H, H) (CDOpt's
    choice for ``nn.LSTM``'s (4H, H) ``weight_hh``).  ``"per_gate"``: each of the k
    H x H row blocks (PyTorch's gate order i, f, g, o for an LSTM) is a point of O(H).

    Parameters
    ----------
    W : Tensor, shape (..., k H, H)
    granularity : {"stacked", "per_gate"}

    Returns
    -------
    Tensor
        Shape (..., 1, k H, H) for ``"stacked"``, (..., k, H, H) for ``"per_gate"``;
        a view of ``W`` (no copy).

    Raises
    ------
    ValueError
        Unknown granularity, or rows not a multiple of columns for ``"per_gate"``.
    """
    check_granularity(granularity)
    stiefel.check_point(W, "weight")
    if granularity == "stacked":
        return W.unsqueeze(-3)
    rows, cols = W.shape[-2:]
    if rows % cols:
        raise ValueError(f"per_gate needs a (k*H, H) weight; got shape {tuple(W.shape)}")
    return W.reshape(*W.shape[:-2], rows // cols, cols, cols)


def from_blocks(B: Tensor, granularity: str) -> Tensor:
    """Inverse of :func:`to_blocks`: shape (..., k, H, H) or (..., 1, n, p) back to the weight's shape."""
    check_granularity(granularity)
    if granularity == "stacked":
        return B.squeeze(-3)
    k, h, _ = B.shape[-3:]
    return B.reshape(*B.shape[:-3], k * h, h)


def project(W: Tensor, granularity: str) -> Tensor:
    """Nearest point of the manifold for a weight: the polar factor of each block.

    Parameters
    ----------
    W : Tensor, shape (k H, H) or (n, p), n >= p
    granularity : {"stacked", "per_gate"}

    Returns
    -------
    Tensor, shape and dtype of ``W``, no autograd history
        :func:`cdcore.stiefel.projx` of each block of :func:`to_blocks`.

    Raises
    ------
    ValueError
        Bad shape or granularity.
    """
    return from_blocks(stiefel.projx(to_blocks(W, granularity)), granularity)


def dissolve_map(X: Tensor) -> Tensor:
    r"""Constraint-dissolving map A(X) = X (3/2 I_p - 1/2 X^T X) ([XLT22]_, [HXLT22]_).

    A(X) = X on St(n, p), and ||C(A(X))||_F = O(||C(X)||_F^2) near it.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), n >= p, floating dtype

    Returns
    -------
    Tensor, shape (..., n, p)

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    return dissolve_with_penalty(X)[0]


def quad_penalty_value(X: Tensor) -> Tensor:
    r"""||X^T X - I_p||_F^2 per matrix: shape (...) for ``X`` of shape (..., n, p).

    Multiply by ``penalty_param`` for CDOpt's penalty term ([HXLT22]_, with
    penalty_param = beta / 2).
    """
    return dissolve_with_penalty(X)[1]


def dissolve_with_penalty(X: Tensor) -> tuple[Tensor, Tensor]:
    r"""A(X) and ||X^T X - I_p||_F^2 sharing one Gram matrix X^T X.

    The backward is the closed form of :func:`dissolve_vjp` (three n p^2 products per
    matrix instead of the four that autograd records through the two forward products);
    it is differentiable again, so Hessian-vector products work.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), n >= p, floating dtype

    Returns
    -------
    A : Tensor, shape (..., n, p)
        X (3/2 I - 1/2 X^T X) = X - 1/2 X C(X)  ([XLT22]_, [HXLT22]_).
    sq : Tensor, shape (...)
        ||C(X)||_F^2, the penalty per matrix before ``penalty_param``.

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    stiefel.check_point(X)
    return _DissolveWithPenalty.apply(X)


def dissolve_vjp(X: Tensor, C: Tensor, grad_A: Tensor | None, grad_sq: Tensor | None) -> Tensor:
    r"""Gradient of <G, A(X)> + sum g ||C(X)||_F^2 with respect to X, in closed form.

    With C = X^T X - I and G = ``grad_A``, g = ``grad_sq``:

    .. math::
        \nabla = G \left(I - \tfrac12 C\right) - X \left(\mathrm{sym}(X^T G) - 4 g\, C\right),

    the adjoint of the Jacobian of A (which is self-adjoint, [XLT22]_ Sec. 4; CDOpt's
    ``stiefel_torch.JA``) applied to G, plus the gradient 4 X C of ||C||_F^2.

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
    C : Tensor, shape (..., p, p)
        X^T X - I, as computed in the forward (or recomputed to differentiate again).
    grad_A : Tensor of shape (..., n, p), or None for zero
    grad_sq : Tensor of shape (...), or None for zero

    Returns
    -------
    Tensor, shape (..., n, p), dtype of ``X``
    """
    S = torch.zeros_like(C)
    if grad_sq is not None:
        S = -4.0 * grad_sq[..., None, None] * C
    if grad_A is None:
        return -(X @ S)
    S = S + stiefel.sym(X.transpose(-2, -1) @ grad_A)
    return _addmm(_addmm(grad_A, grad_A, C, -0.5), X, S, -1.0)


def _addmm(T: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    """T + alpha A @ B in one fused BLAS call (addmm / baddbmm) for any batch shape."""
    if A.dim() == 2:
        return torch.addmm(T, A, B, alpha=alpha)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], T.shape[:-2])
    out = torch.baddbmm(
        T.expand(*batch, *T.shape[-2:]).reshape(-1, *T.shape[-2:]),
        A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:]),
        B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:]),
        alpha=alpha,
    )
    return out.reshape(*batch, *out.shape[-2:])


class _DissolveWithPenalty(torch.autograd.Function):
    """(A(X), ||C(X)||_F^2) with the closed-form backward of :func:`dissolve_vjp`."""

    @staticmethod
    def forward(ctx, X: Tensor):
        C = stiefel.constraint(X)
        A = _addmm(X, X, C, -0.5)  # X - X C / 2
        ctx.save_for_backward(X, C)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        return A, C.square().sum(dim=(-2, -1))

    @staticmethod
    def backward(ctx, grad_A: Tensor | None, grad_sq: Tensor | None):
        X, C = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: C must carry its dependence on X
            C = stiefel.constraint(X)
        return dissolve_vjp(X, C, grad_A, grad_sq)


class Dissolve(nn.Module):
    r"""``torch.nn.utils.parametrize`` parametrisation W -> A(W) on St(n, p) blocks.

    The forward returns the weight that the module uses, A(W) applied blockwise
    according to ``granularity`` (see :func:`to_blocks`).  ``right_inverse`` projects
    onto the manifold (polar factor), so registering it moves the raw weight onto
    St(n, p), where A is the identity.

    Parameters
    ----------
    penalty_param : float
        Weight of ||W^T W - I||_F^2 in the loss (CDOpt's convention; beta / 2).
        Must be finite and >= 0; 0 warns, since then nothing pulls W back.
    granularity : {"stacked", "per_gate"}

    Raises
    ------
    ValueError
        On a bad ``penalty_param`` or ``granularity``.
    """

    def __init__(self, penalty_param: float, granularity: str = "stacked") -> None:
        super().__init__()
        self.penalty_param = check_penalty_param(penalty_param)
        self.granularity = check_granularity(granularity)
        if self.penalty_param == 0:
            warnings.warn(
                "penalty_param=0 on a dissolved weight: nothing pulls it back to the Stiefel manifold",
                stacklevel=3,
            )

    def forward(self, X: Tensor) -> Tensor:
        return from_blocks(dissolve_map(to_blocks(X, self.granularity)), self.granularity)

    def right_inverse(self, W: Tensor) -> Tensor:
        return project(W, self.granularity)

    def penalty(self, X: Tensor) -> Tensor:
        """``penalty_param * ||C||_F^2`` summed over the blocks of the raw weight ``X`` (a scalar)."""
        return self.penalty_param * quad_penalty_value(to_blocks(X, self.granularity)).sum()

    def extra_repr(self) -> str:
        return f"penalty_param={self.penalty_param}, granularity={self.granularity!r}"
