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

import contextlib
import math
import os
import sys
import warnings

import torch
from torch import Tensor, nn

from . import stiefel

__all__ = [
    "GRANULARITIES",
    "Dissolve",
    "check_granularity",
    "check_penalty_param",
    "compute_dtype",
    "dissolve_blocks",
    "dissolve_map",
    "dissolve_vjp",
    "dissolve_with_penalty",
    "from_blocks",
    "project",
    "quad_penalty_blocks",
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the constraint arithmetic runs in for parameters of ``dtype``.

    float64 stays float64; every other floating dtype (float32, float16, bfloat16) computes in
    float32: the Gram matrix X^T X of a half-precision weight would round C(X) to about 1e-3,
    the size of what the penalty measures.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(t: Tensor):
    """A context that disables autocast on ``t``'s device when it is on (else a no-op)."""
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def dissolve_map(X: Tensor) -> Tensor:
    r"""Constraint-dissolving map A(X) = X (3/2 I_p - 1/2 X^T X) ([XLT22]_, [HXLT22]_).

    A(X) = X on St(n, p), and ||C(A(X))||_F = O(||C(X)||_F^2) near it.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), n >= p, floating dtype

    Returns
    -------
    Tensor, shape (..., n, p), dtype of ``X``
        Computed in :func:`compute_dtype` with autocast disabled (see :func:`dissolve_with_penalty`).

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    return dissolve_with_penalty(X)[0]


def quad_penalty_value(X: Tensor) -> Tensor:
    r"""||X^T X - I_p||_F^2 per matrix: shape (...) for ``X`` of shape (..., n, p).

    Multiply by ``penalty_param`` for CDOpt's penalty term ([HXLT22]_, with
    penalty_param = beta / 2).  One Gram matrix per matrix in the forward, one n p^2 product
    (the gradient 4 X C) in the backward; differentiable again.  Computed in
    :func:`compute_dtype` with autocast disabled; the result has that dtype (float32 for
    half-precision ``X``), so a loss that adds it keeps its precision.

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    stiefel.check_point(X)
    with _autocast_off(X):
        return _QuadPenalty.apply(_as_batch(X).to(compute_dtype(X.dtype)))[0].reshape(X.shape[:-2])


def dissolve_with_penalty(X: Tensor) -> tuple[Tensor, Tensor]:
    r"""A(X) and ||X^T X - I_p||_F^2 sharing one Gram matrix X^T X.

    The backward is the closed form of :func:`dissolve_vjp` (three n p^2 products per
    matrix instead of the four that autograd records through the two forward products);
    it is differentiable again (Hessian-vector products, ``gradgradcheck``), has a forward-mode
    rule (``torch.func.jvp``, ``jacfwd``) and a generated ``vmap`` rule, so every
    ``torch.func`` transform composes with it.

    Mixed precision: the arithmetic runs with autocast disabled in :func:`compute_dtype`
    (float64 for float64 input, float32 otherwise), forward and backward; A is cast back to
    the dtype of ``X``.  Under ``torch.autocast`` a float32 weight therefore gets a float32
    A(W) and float32 gradients, whatever the autocast dtype.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), n >= p, floating dtype

    Returns
    -------
    A : Tensor, shape (..., n, p), dtype of ``X``
        X (3/2 I - 1/2 X^T X) = X - 1/2 X C(X)  ([XLT22]_, [HXLT22]_).
    sq : Tensor, shape (...), dtype :func:`compute_dtype` of ``X``
        ||C(X)||_F^2, the penalty per matrix before ``penalty_param``.

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    stiefel.check_point(X)
    with _autocast_off(X):
        A, sq, _ = _DissolveWithPenalty.apply(_as_batch(X).to(compute_dtype(X.dtype)))
        return A.reshape(X.shape).to(X.dtype), sq.reshape(X.shape[:-2])


def _as_batch(X: Tensor) -> Tensor:
    """``X`` as one matrix (n, p) or one batch (m, n, p): the autograd.Functions see no other shapes,
    so their outputs are never views of their intermediates (forward-mode AD requires it)."""
    return X.reshape(-1, *X.shape[-2:]) if X.dim() > 3 else X


def dissolve_vjp(
    X: Tensor, C: Tensor, grad_A: Tensor | None, grad_sq: Tensor | None, grad_C: Tensor | None = None
) -> Tensor:
    r"""Gradient of <G, A(X)> + sum g ||C(X)||_F^2 (+ <G_C, C(X)>) with respect to X, in closed form.

    With C = X^T X - I, G = ``grad_A``, g = ``grad_sq`` and G_C = ``grad_C``:

    .. math::
        \nabla = G \left(I - \tfrac12 C\right)
                 - X \left(\mathrm{sym}(X^T G) - 4 g\, C - 2\,\mathrm{sym}(G_C)\right),

    the adjoint of the Jacobian of A (which is self-adjoint, [XLT22]_ Sec. 4; CDOpt's
    ``stiefel_torch.JA``) applied to G, plus the gradient 4 X C of ||C||_F^2 and the adjoint
    2 X sym(G_C) of X -> X^T X - I.

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
    C : Tensor, shape (..., p, p)
        X^T X - I, as computed in the forward (or recomputed to differentiate again).
    grad_A : Tensor of shape (..., n, p), or None for zero
    grad_sq : Tensor of shape (...), or None for zero
    grad_C : Tensor of shape (..., p, p), or None for zero

    Returns
    -------
    Tensor, shape (..., n, p), dtype of ``X``
    """
    S = None
    if grad_sq is not None:
        S = -4.0 * grad_sq[..., None, None] * C
    if grad_C is not None:
        S2 = -2.0 * stiefel.sym(grad_C)
        S = S2 if S is None else S + S2
    if grad_A is None:
        return torch.zeros_like(X) if S is None else -(X @ S)
    S = (
        stiefel.sym(X.transpose(-2, -1) @ grad_A)
        if S is None
        else S + stiefel.sym(X.transpose(-2, -1) @ grad_A)
    )
    return _addmm(_addmm(grad_A, grad_A, C, -0.5), X, S, -1.0)


def _addmm(T: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    """T + alpha A @ B in one fused BLAS call (addmm / baddbmm) for any batch shape."""
    if A.dim() == 2 and B.dim() == 2 and T.dim() == 2:
        return torch.addmm(T, A, B, alpha=alpha)
    if A.dim() == B.dim() == T.dim() == 3 and A.shape[0] == B.shape[0] == T.shape[0]:
        return torch.baddbmm(T, A, B, alpha=alpha)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], T.shape[:-2])
    out = torch.baddbmm(
        T.expand(*batch, *T.shape[-2:]).reshape(-1, *T.shape[-2:]),
        A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:]),
        B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:]),
        alpha=alpha,
    )
    return out.reshape(*batch, *out.shape[-2:])


def _recompute_if_differentiating(X: Tensor, C: Tensor) -> Tensor:
    """C as saved, or recomputed from X when the backward itself is being recorded.

    A backward recorded for a second derivative (``create_graph=True``, ``torch.func``
    transforms) needs C's dependence on X; a plain backward reuses the forward's C.
    """
    return stiefel.constraint(X) if torch.is_grad_enabled() else C


class _DissolveWithPenalty(torch.autograd.Function):
    """(A(X), ||C(X)||_F^2, C(X)) with the closed-form backward of :func:`dissolve_vjp`.

    ``setup_context`` style with a generated vmap rule, so ``torch.func`` transforms work;
    C is returned so that ``setup_context`` can save it (the wrappers drop it).  Callers
    disable autocast and pass float32/float64 (see :func:`dissolve_with_penalty`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor):
        C = stiefel.constraint(X)
        A = _addmm(X, X, C, -0.5)  # X - X C / 2
        return A, C.square().sum(dim=(-2, -1)), C

    @staticmethod
    def setup_context(ctx, inputs, output):
        (X,), (_, _, C) = inputs, output
        ctx.save_for_backward(X, C)
        ctx.save_for_forward(X, C)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it

    @staticmethod
    def backward(ctx, grad_A, grad_sq, grad_C):
        X, C = ctx.saved_tensors
        with _autocast_off(X):
            return dissolve_vjp(X, _recompute_if_differentiating(X, C), grad_A, grad_sq, grad_C)

    @staticmethod
    def jvp(ctx, dX):
        X, C = ctx.saved_tensors
        with _autocast_off(X):
            dC = 2.0 * stiefel.sym(X.transpose(-2, -1) @ dX)
            dA = dX - 0.5 * (dX @ C + X @ dC)
            return dA, 2.0 * (C * dC).sum(dim=(-2, -1)), dC


class _QuadPenalty(torch.autograd.Function):
    """(||C(X)||_F^2, C(X)): one Gram matrix forward, 4 X C g backward (no A computed)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor):
        C = stiefel.constraint(X)
        return C.square().sum(dim=(-2, -1)), C

    @staticmethod
    def setup_context(ctx, inputs, output):
        (X,), (_, C) = inputs, output
        ctx.save_for_backward(X, C)
        ctx.save_for_forward(X, C)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_sq, grad_C):
        X, C = ctx.saved_tensors
        with _autocast_off(X):
            return dissolve_vjp(X, _recompute_if_differentiating(X, C), None, grad_sq, grad_C)

    @staticmethod
    def jvp(ctx, dX):
        X, C = ctx.saved_tensors
        with _autocast_off(X):
            dC = 2.0 * stiefel.sym(X.transpose(-2, -1) @ dX)
            return 2.0 * (C * dC).sum(dim=(-2, -1)), dC


def dissolve_blocks(weights: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """A(W) of a stack of weights and the penalty of each, in one batched operation.

    Parameters
    ----------
    weights : Tensor, shape (k, g H, H)
        k weights of one shape (e.g. every ``weight_hh`` of a recurrent module).
    granularity : {"stacked", "per_gate"}

    Returns
    -------
    A : Tensor, shape (k, g H, H), dtype of ``weights``
        A of each weight, blockwise according to ``granularity`` (:func:`to_blocks`).
    sq : Tensor, shape (k,)
        ||C||_F^2 of each weight against its granularity (summed over its blocks).
    """
    blocks = to_blocks(weights, granularity)
    A, sq = dissolve_with_penalty(blocks.flatten(0, 1))
    return from_blocks(A.reshape(blocks.shape), granularity), sq.reshape(blocks.shape[:2]).sum(dim=1)


def quad_penalty_blocks(weights: Tensor, granularity: str) -> Tensor:
    """||C||_F^2 of each of a stack of weights (shape (k, g H, H) -> (k,)) in one batched operation."""
    blocks = to_blocks(weights, granularity)
    return quad_penalty_value(blocks.flatten(0, 1)).reshape(blocks.shape[:2]).sum(dim=1)


def _caller_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that points at the first frame outside cdcore.

    Counted from the caller of this function: constructors reached through
    ``from_lstm`` or ``cdcore.dissolve`` still warn at the user's line.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    return level


def warn_zero_penalty(what: str) -> None:
    """Warn (at the caller's line outside cdcore) that nothing pulls ``what`` back to the manifold."""
    warnings.warn(
        f"penalty_param=0 on {what}: nothing pulls W back to the Stiefel manifold",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


class Dissolve(nn.Module):
    r"""``torch.nn.utils.parametrize`` parametrisation W -> A(W) on St(n, p) blocks.

    The forward returns the weight that the module uses, A(W) applied blockwise
    according to ``granularity`` (see :func:`to_blocks`).  Registering it (normally through
    :func:`cdcore.dissolve`) calls ``right_inverse`` once, which projects the weight onto the
    manifold (polar factor), where A is the identity.

    After that first call ``right_inverse`` refuses: A has no inverse, and a projection
    in its place would silently replace the raw weight (``module.weight = T`` or
    ``torch.func.functional_call(module, {"weight": T}, ...)`` would train on the projection
    of T and, on restore, write the projection of A(W) into the raw weight).  Set the raw
    weight instead: ``parametrizations.<name>.original``.

    Parameters
    ----------
    penalty_param : float
        Weight of ||W^T W - I||_F^2 in the loss (CDOpt's convention; beta / 2).
        Must be finite and >= 0; 0 warns, since then nothing pulls W back.
    granularity : {"stacked", "per_gate"}

    Raises
    ------
    ValueError
        On a bad ``penalty_param`` or ``granularity``; from ``right_inverse`` after registration.
    """

    def __init__(self, penalty_param: float, granularity: str = "stacked") -> None:
        super().__init__()
        self.penalty_param = check_penalty_param(penalty_param)
        self.granularity = check_granularity(granularity)
        self.tensor_name: str | None = None  # set by cdcore.dissolve, for error messages
        self._projected = False
        if self.penalty_param == 0:
            warn_zero_penalty("a dissolved weight")

    def forward(self, X: Tensor) -> Tensor:
        return from_blocks(dissolve_map(to_blocks(X, self.granularity)), self.granularity)

    def right_inverse(self, W: Tensor) -> Tensor:
        if self._projected:
            name = self.tensor_name or "<name>"
            raise ValueError(
                f"cannot assign the dissolved weight {name!r}: A(W) has no inverse, and projecting "
                f"instead would silently change the raw weight; assign (or pass to "
                f"torch.func.functional_call) the raw weight 'parametrizations.{name}.original' instead"
            )
        self._projected = True
        return project(W, self.granularity)

    def penalty(self, X: Tensor) -> Tensor:
        """``penalty_param * ||C||_F^2`` summed over the blocks of the raw weight ``X`` (a scalar)."""
        return self.penalty_param * quad_penalty_value(to_blocks(X, self.granularity)).sum()

    def extra_repr(self) -> str:
        return f"penalty_param={self.penalty_param}, granularity={self.granularity!r}"
