r"""Pure, batched functions on the Stiefel manifold.

St(n, p) = {X in R^{n x p} : X^T X = I_p}, n >= p.  Every function takes tensors of
shape ``(..., n, p)`` (any number of leading batch dimensions) and works for any
floating dtype on any device.  Nothing here holds state; the modules and optimisers
of :mod:`cdcore` are thin wrappers over these functions.

References
----------
.. [AMS08] P.-A. Absil, R. Mahony, R. Sepulchre, *Optimization Algorithms on Matrix
   Manifolds*, Princeton University Press, 2008.
.. [WY13] Z. Wen, W. Yin, "A feasible method for optimization with orthogonality
   constraints", Math. Program. 142 (2013) 397-434.
.. [EAS98] A. Edelman, T. Arias, S. Smith, "The geometry of algorithms with
   orthogonality constraints", SIAM J. Matrix Anal. Appl. 20 (1998) 303-353.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_point",
    "constraint",
    "feasibility",
    "projx",
    "proju",
    "random_point",
    "retr_cayley",
    "sym",
]


def check_point(X: Tensor, name: str = "X") -> None:
    """Raise if ``X`` cannot hold points of a Stiefel manifold.

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
        Candidate tensor; must be floating point with at least 2 dimensions and n >= p.
    name : str
        Name used in the error message.

    Raises
    ------
    ValueError
        If ``X`` has fewer than 2 dimensions, is not floating point, or n < p.
    """
    if not isinstance(X, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, p), got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {X.dtype}")
    n, p = X.shape[-2:]
    if n < p:
        raise ValueError(
            f"{name} of shape {tuple(X.shape)} is not on any St(n, p): needs n >= p, got n={n}, p={p}"
        )


def sym(M: Tensor) -> Tensor:
    """Symmetric part (M + M^T) / 2 of a batch of square matrices, shape (..., p, p)."""
    return 0.5 * (M + M.transpose(-2, -1))


_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic for ``dtype``: float32 for half precision (whose linear algebra
    torch does not implement, and whose rounding would swamp the retraction), else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def _eye_like(X: Tensor) -> Tensor:
    p = X.shape[-1]
    return torch.eye(p, dtype=X.dtype, device=X.device)


def constraint(X: Tensor) -> Tensor:
    r"""Constraint map C(X) = X^T X - I_p of St(n, p).

    Parameters
    ----------
    X : Tensor, shape (..., n, p), floating dtype

    Returns
    -------
    Tensor, shape (..., p, p), same dtype and device as ``X``
        Zero exactly when every matrix of the batch is on St(n, p).

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.

    Notes
    -----
    The orthogonality constraint of [WY13]_; CDOpt calls it ``C``.
    """
    check_point(X)
    return X.transpose(-2, -1) @ X - _eye_like(X)


def feasibility(X: Tensor) -> Tensor:
    r"""Feasibility ||X^T X - I_p||_F of each matrix of a batch, computed in float64.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), floating dtype

    Returns
    -------
    Tensor, shape (...), dtype float64, no autograd history
        The Frobenius norm of the constraint map, one value per matrix; 0 on St(n, p).
        The Gram matrix is formed in float64: in float32 its own rounding (about
        1e-5 for a 400 x 100 matrix) would hide the quantity being measured.

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    with torch.no_grad():
        return torch.linalg.matrix_norm(constraint(X.detach().to(torch.float64)))


def projx(X: Tensor) -> Tensor:
    r"""Nearest point of St(n, p) in the Frobenius norm: the polar factor U V^T.

    Parameters
    ----------
    X : Tensor, shape (..., n, p), floating dtype, full column rank

    Returns
    -------
    Tensor, shape (..., n, p)
        U V^T where X = U S V^T is the thin SVD ([AMS08]_, sec. 4.1 (projective retraction);
        Higham, *Functions of Matrices*, 2008, Thm. 8.4).  Computed in float64 (then cast back to X's
        dtype) and without autograd history: a float32 SVD alone leaves
        ||X^T X - I||_F near 1e-5 for a 400 x 100 matrix, float64 about 2e-7.

    Raises
    ------
    ValueError
        If ``X`` is not of shape (..., n, p) with n >= p.
    """
    check_point(X)
    with torch.no_grad():
        U, _, Vh = torch.linalg.svd(X.detach().to(torch.float64), full_matrices=False)
        return (U @ Vh).to(X.dtype)


def proju(X: Tensor, U: Tensor) -> Tensor:
    r"""Orthogonal projection of ``U`` onto the tangent space of St(n, p) at ``X``.

    P_X(U) = U - X sym(X^T U)  ([AMS08]_, ch. 3, the Stiefel manifold as a Riemannian submanifold).
    The result satisfies X^T P + P^T X = 0; the map is idempotent.

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
        A point of St(n, p).
    U : Tensor, shape (..., n, p)
        Any ambient matrix (e.g. a Euclidean gradient).

    Returns
    -------
    Tensor, shape (..., n, p)

    Raises
    ------
    ValueError
        If the shapes differ or are not (..., n, p) with n >= p.
    """
    check_point(X)
    if U.shape != X.shape:
        raise ValueError(f"U must have the shape of X {tuple(X.shape)}, got {tuple(U.shape)}")
    return U - X @ sym(X.transpose(-2, -1) @ U)


def random_point(
    n: int,
    p: int,
    *batch: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""A point of St(n, p) drawn from the uniform (Haar) distribution.

    The Q factor of a Gaussian matrix with the signs of diag(R) fixed to be positive
    (Mezzadri, "How to generate random matrices from the classical compact groups",
    Notices AMS 54 (2007), 592-604).

    Parameters
    ----------
    n, p : int
        Manifold dimensions, n >= p >= 1.
    *batch : int
        Leading batch dimensions.
    generator, dtype, device
        As for :func:`torch.randn`.

    Returns
    -------
    Tensor, shape (*batch, n, p), dtype ``dtype``
        For float16 / bfloat16 drawn and factored in float32 (torch has no half QR), then cast.

    Raises
    ------
    ValueError
        If not n >= p >= 1.
    """
    if not (isinstance(n, int) and isinstance(p, int) and n >= p >= 1):
        raise ValueError(f"random_point needs integers n >= p >= 1, got n={n!r}, p={p!r}")
    out_dtype = torch.get_default_dtype() if dtype is None else dtype
    G = torch.randn(*batch, n, p, generator=generator, dtype=_work_dtype(out_dtype), device=device)
    Q, R = torch.linalg.qr(G)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (Q * signs.unsqueeze(-2)).to(out_dtype)


def retr_cayley(X: Tensor, U: Tensor, step: float | Tensor = 1.0) -> Tensor:
    r"""Cayley retraction of the canonical metric, in O(n p^2) operations.

    Moves from ``X`` in the direction ``U`` by ``step``:

    .. math::
        Y(t) = (I - \tfrac{t}{2} W)^{-1} (I + \tfrac{t}{2} W) X,
        \quad W = \tilde U X^T - X \tilde U^T,\quad \tilde U = (I - \tfrac12 X X^T) U,

    so that W is skew, W X = U for tangent U and Y'(0) = U ([WY13]_, the Cayley update
    scheme; [EAS98]_ for the canonical metric).  With W = A B^T, A = [Ũ, X],
    B = [X, -Ũ], the Sherman-Morrison-Woodbury formula gives ([WY13]_, Lemma 4)
    Y(t) = X + t A (I_{2p} - (t/2) B^T A)^{-1} B^T X.  On St(n, p) (X^T X = I) block
    elimination of that 2p x 2p system leaves one p x p matrix: with a = t/2,
    P = X^T Ũ = X^T U / 2, R = Ũ^T Ũ = U^T U - (3/4) (X^T U)^T X^T U and E = I - a P,

    .. math::
        Y(t) = X + t \left[U - X\left(\tfrac12 X^T U + P^T E + a R\right)\right] K^{-1},
        \qquad K = (I + a P^T) E + a^2 R,

    which costs four n x p x p products (X^T U, U^T U, the X product, the K^{-1} product)
    and a p x p inverse; K is invertible whenever I - (t/2) W is, i.e. always.  Y^T Y = I
    in exact arithmetic; the identity X^T X = I is used, so a point off the manifold by
    delta = ||X^T X - I|| moves by an extra O(t ||U|| delta).

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
        A point of St(n, p).
    U : Tensor, shape (..., n, p)
        A direction at ``X``, normally tangent (e.g. minus a Riemannian gradient times a
        learning rate); for any U the result is the Cayley curve of W above.
    step : float or Tensor broadcastable to (...)
        The step length t.

    Returns
    -------
    Tensor, shape (..., n, p), dtype of ``X``
        For float16 / bfloat16 inputs the arithmetic is done in float32 and the result cast
        back (torch has no half-precision inverse, and half rounding would swamp the update).

    Raises
    ------
    ValueError
        If the shapes differ or are not (..., n, p) with n >= p.

    Notes
    -----
    The p x p inverse is ``torch.linalg.inv_ex`` without its error check, so the call never
    makes the host wait for a device; K is always invertible for finite inputs, and a
    non-finite input gives a non-finite result rather than an exception.
    """
    check_point(X)
    if U.shape != X.shape:
        raise ValueError(f"U must have the shape of X {tuple(X.shape)}, got {tuple(U.shape)}")
    out_dtype = X.dtype
    X, U = X.to(_work_dtype(out_dtype)), U.to(_work_dtype(out_dtype))
    if isinstance(step, Tensor):
        a = 0.5 * step.to(dtype=X.dtype).reshape(step.shape + (1, 1))
    else:
        a = 0.5 * float(step)
    XtU = X.transpose(-2, -1) @ U
    P = 0.5 * XtU
    R = U.transpose(-2, -1) @ U - 0.75 * (XtU.transpose(-2, -1) @ XtU)
    eye = _eye_like(X)
    E = eye - a * P
    Pt = P.transpose(-2, -1)
    K = (eye + a * Pt) @ E + (a * a) * R
    Z = U - X @ (P + Pt @ E + a * R)  # (1/2) X^T U = P
    K_inv, _ = torch.linalg.inv_ex(K, check_errors=False)
    return (X + (2 * a) * (Z @ K_inv)).to(out_dtype)
