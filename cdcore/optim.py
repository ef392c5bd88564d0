r"""Riemannian optimisers on St(n, p) with the Cayley retraction.

``CayleySGD`` and ``CayleyAdam`` follow Li, Fuxin and Todorovic, "Efficient Riemannian
optimization on the Stiefel manifold via the Cayley transform", ICLR 2020
(arXiv:2002.01113), Algorithms 1 and 2 (``CayleyRMSprop``: Alg. 2 with beta1 = 0 and no bias
correction, as :class:`torch.optim.RMSprop`): momentum is kept in the tangent space and the
update moves along the Cayley curve.  Where that paper iterates a fixed point on an
n x n skew matrix, these optimisers use the closed-form Cayley retraction in its
Sherman-Morrison-Woodbury form (:func:`cdcore.stiefel.retr_cayley`, Wen & Yin 2013),
so a tall (4H, H) LSTM weight really moves on St(4H, H) at O(n p^2) cost.

Param groups mark Stiefel parameters with ``"stiefel": True`` (and optionally
``"granularity"``: ``"stacked"`` or ``"per_gate"``); every other group gets plain
Adam (``CayleyAdam``, the update of :class:`torch.optim.Adam`), RMSprop (``CayleyRMSprop``, the
update of :class:`torch.optim.RMSprop`) or SGD with momentum (``CayleySGD``).  ``step`` and
``add_param_group`` (where every group is validated) are overridden; parameters are updated in
place, so ``nn.LSTM`` keeps its flat weight buffers.  Stiefel parameters of one shape are updated
together in one batched operation, each with its own step count.  A Stiefel parameter may have
leading batch dimensions, (..., n, p): each matrix is a point of St(n, p).

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

__all__ = ["CayleyAdam", "CayleyRMSprop", "CayleySGD"]


def _number(name: str, value, *, low: float, low_open: bool = False, high: float | None = None) -> float:
    """``value`` as a float if finite and in range, else ValueError naming it (bool is not a number)."""
    bound = (f"> {low:g}" if low_open else f">= {low:g}") + (f" and < {high:g}" if high is not None else "")
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}") from None
    if not math.isfinite(v) or v < low or (low_open and v == low) or (high is not None and v >= high):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return v


class _CayleyBase(torch.optim.Optimizer):
    """Shared by CayleySGD and CayleyAdam: validation, the non-finite check, batched Stiefel buckets.

    Every check of a param group (hyperparameters, ``stiefel``, ``granularity``, shapes) runs
    in :meth:`add_param_group`, which the constructor calls for each group, so a group added
    later is held to the same rules; ``step`` validates nothing but the gradients' finiteness.
    """

    def __init__(self, params, defaults: dict) -> None:
        defaults.setdefault("stiefel", False)
        defaults.setdefault("granularity", "stacked")
        self._check_hyperparameters(defaults, "")
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        _number(f"{where}lr", group["lr"], low=0)
        _number(f"{where}weight_decay", group["weight_decay"], low=0)
        _number(f"{where}feasibility_tol", group["feasibility_tol"], low=0, low_open=True)
        every = group["check_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{where}check_every must be an integer >= 1; got {every!r}")
        if not isinstance(group["stiefel"], bool):
            raise ValueError(f"{where}stiefel must be True or False; got {group['stiefel']!r}")

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group after validating it like the constructor's (see the class docstring).

        Raises
        ------
        ValueError
            A bad hyperparameter, ``stiefel`` flag or ``granularity``; a Stiefel parameter that is
            not of shape (..., n, p) with n >= p (``"stacked"``) or (..., k H, H) (``"per_gate"``),
            or not floating point; an explicit non-zero ``weight_decay`` in a Stiefel group.  The
            optimiser is left as it was.
        """
        where = f"param group {len(self.param_groups)}: "
        explicit_decay = param_group.get("weight_decay", 0) if isinstance(param_group, dict) else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_hyperparameters(group, where)
            if group["stiefel"]:
                if explicit_decay != 0:
                    raise ValueError(
                        f"{where}weight_decay must be 0 in a Stiefel group (a decayed point leaves the "
                        f"manifold; the optimiser-wide weight_decay applies to Euclidean groups only); "
                        f"got {explicit_decay!r}"
                    )
                check_granularity(group["granularity"])
                for i, p in enumerate(group["params"]):
                    try:
                        to_blocks(p, group["granularity"])
                    except ValueError as e:
                        raise ValueError(f"{where}Stiefel parameter {i}: {e}") from None
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the loss (optional).

        Raises
        ------
        ValueError
            On a CPU, a Stiefel parameter's gradient holds inf or NaN (checked for all of
            them before anything is modified; the message names the group, the index in it
            and the shape).  Off the CPU this check would make the host wait for the device
            every step, so instead each matrix with a non-finite gradient keeps its value and
            moments (device-side ``torch.where``) and nothing is raised.  A step that raises
            for any reason leaves every parameter and all state unchanged (every update is
            computed before any is written).  With
            ``torch.amp.GradScaler`` this never fires: the scaler skips ``step`` itself when
            it finds non-finite gradients.  Euclidean groups behave as ``torch.optim``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        host_check = self._host_checks(self)
        if host_check:
            self._check_finite()
        writes = []  # every Stiefel update is computed before any parameter or state is written
        for group in self.param_groups:
            if group["stiefel"]:
                buckets: dict[tuple, list[Tensor]] = {}
                for p in group["params"]:
                    if p.grad is not None:
                        buckets.setdefault((p.shape, p.dtype, p.device), []).append(p)
                for params in buckets.values():
                    writes.extend(self._stiefel_bucket(group, params, guard=not host_check))
        if writes:
            ps, ys, sts, ms, vs = zip(*writes)
            torch._foreach_copy_([*ps, *(st["momentum"] for st in sts)], [*ys, *ms])
            torch._foreach_copy_([st["second_moment"] for st in sts], list(vs))
            for p, st in zip(ps, sts):
                self.state[p] = st
        for group in self.param_groups:
            if not group["stiefel"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._euclidean(group, p)
        return loss

    @staticmethod
    def _host_checks(opt) -> bool:
        """Whether ``step`` checks Stiefel gradients on the host (raising, naming the parameter).

        True unless a Stiefel parameter lives on an accelerator, where reading the flag would
        make the host wait for the device every step; there a matrix whose gradient is not
        finite is instead left unchanged, with its state, by a device-side ``torch.where``.
        A staticmethod so that tests can exercise the device branch on a CPU.
        """
        return all(p.device.type == "cpu" for g in opt.param_groups if g["stiefel"] for p in g["params"])

    def _check_finite(self) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            if group["stiefel"]:
                for p in group["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
        if all(bool(torch.stack([g.isfinite().all() for g in grads]).all()) for grads in by_device.values()):
            return
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if group["stiefel"] and p.grad is not None and not bool(p.grad.isfinite().all()):
                    raise ValueError(
                        f"non-finite gradient (inf or NaN) for Stiefel parameter {i} of param group {gi}, "
                        f"shape {tuple(p.shape)}: no parameter was updated (skip such steps, as "
                        f"torch.amp.GradScaler does)"
                    )

    def _stiefel_bucket(self, group: dict, params: list[Tensor], guard: bool = False) -> list[tuple]:
        """Compute the update of Stiefel parameters of one shape, dtype and device in one batch.

        Each parameter keeps its own step count (bias correction and feasibility checks are
        per parameter, so a parameter whose first gradient comes late starts its own count).
        Nothing is written: returns ``(param, new value, new state, momentum, second moment)``
        tuples, applied by
        :meth:`step` once every bucket has been computed, so a step that raises leaves all
        parameters and all state as they were.  For float16 / bfloat16 parameters the
        arithmetic is done in float32 (:func:`cdcore.stiefel.retr_cayley` likewise); the state
        tensors keep the parameter's dtype.  With ``guard`` (the accelerator path of
        :meth:`step`), a matrix whose gradient is not finite keeps its value and moments
        (``torch.where``, no host synchronisation); its step count still advances.
        """
        gran = group["granularity"]
        work = stiefel._work_dtype(params[0].dtype)
        states, starts = [], []
        for p in params:
            st = dict(self.state.get(p, {}))  # a shallow copy: its tensors are written by step() only
            start = p
            if not st:
                st["step"] = 0
                st["reprojections"] = 0
                st["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                blocks = to_blocks(p, gran)
                st["second_moment"] = p.new_zeros(blocks.shape[:-2])
                if float(stiefel.feasibility(blocks).max()) > group["feasibility_tol"]:
                    start = from_blocks(stiefel.projx(blocks), gran)
                    st["reprojections"] += 1
            states.append(st)
            starts.append(start)
        k = len(params)
        stacked_shape = to_blocks(torch.stack(starts), gran).shape  # (k, ..., b, n, p)
        n, q = stacked_shape[-2:]
        per_param = math.prod(stacked_shape[1:-2])  # matrices per parameter

        def flat(ts):
            return to_blocks(torch.stack(ts), gran).reshape(-1, n, q).to(work)

        X = flat(starts)
        G = flat([p.grad for p in params])
        M = flat([st["momentum"] for st in states])
        V = torch.stack([st["second_moment"] for st in states]).reshape(-1).to(work)
        steps = [st["step"] + 1 for st in states]
        if len(set(steps)) == 1:  # the usual case: a Python number, no host-to-device copy
            t = float(steps[0])
        else:
            t = torch.tensor(steps, dtype=work, device=X.device).repeat_interleave(per_param)
        Y, M1, V1 = self._stiefel_update(group, X, stiefel.proju(X, G), M, V, t)
        if guard:
            ok = G.isfinite().all(dim=(-2, -1))
            okm = ok[:, None, None]
            Y, M, V = torch.where(okm, Y, X), torch.where(okm, M1, M), torch.where(ok, V1, V)
        else:
            M, V = M1, V1
        due = [s % group["check_every"] == 0 for s in steps]
        bad_per_param = [False] * k
        if any(due):
            due_mask = torch.tensor(due, device=X.device).repeat_interleave(per_param)
            bad = (stiefel.feasibility(Y) > group["feasibility_tol"]) & due_mask
            bad_per_param = bad.reshape(k, per_param).any(dim=1).tolist()
            if any(bad_per_param):
                Y = torch.where(bad[:, None, None], stiefel.projx(Y), Y)
                M = stiefel.proju(Y, M)

        def back(T):
            return from_blocks(T.reshape(stacked_shape), gran)

        dtype = params[0].dtype
        Y, M = back(Y).to(dtype), back(M).to(dtype)
        V = V.to(dtype).reshape((k,) + states[0]["second_moment"].shape)
        writes = []
        for i, (p, st, y, m, v) in enumerate(zip(params, states, Y.unbind(), M.unbind(), V.unbind())):
            st["step"] = steps[i]
            st["reprojections"] += int(bad_per_param[i])
            writes.append((p, y, st, m, v))
        return writes

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
        Learning rate (>= 0; 0 leaves the parameters where they are, as in ``torch.optim``).
    momentum : float
        Heavy-ball coefficient in [0, 1).
    weight_decay : float
        L2 penalty (>= 0) of the Euclidean groups.  Stiefel groups ignore the optimiser-wide
        value and refuse an explicit non-zero one (a decayed point leaves the manifold).
    feasibility_tol : float
        Re-project a matrix whose ||X^T X - I||_F (measured in float64) exceeds this,
        checked every ``check_every`` steps.  In float32 the Cayley steps drift by
        about 1e-6 per 100 steps at St(400, 100), so the defaults keep feasibility
        below 1e-5.
    check_every : int
        Steps between feasibility checks (each one synchronises with the device).

    Every group may override any of these; ``step`` updates each Stiefel parameter with its
    own step count and raises before updating anything if a Stiefel gradient is not finite
    (see :meth:`step`).  ``state_dict`` / ``load_state_dict`` round-trip as in ``torch.optim``.

    Raises
    ------
    ValueError
        Bad hyperparameter, ``stiefel`` flag, granularity or Stiefel parameter shape, in the
        constructor and in :meth:`add_param_group` alike (messages name the group).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        feasibility_tol: float = 5e-6,
        check_every: int = 100,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                feasibility_tol=feasibility_tol,
                check_every=check_every,
            ),
        )

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        super()._check_hyperparameters(group, where)
        _number(f"{where}momentum", group["momentum"], low=0, high=1)

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
        Learning rate (>= 0).
    betas : (float, float)
        Moment coefficients, each in [0, 1).
    eps : float
        Denominator term (> 0).
    weight_decay : float
        L2 penalty (>= 0) of the Euclidean groups; see :class:`CayleySGD`.
    feasibility_tol, check_every
        As for :class:`CayleySGD`.

    Notes
    -----
    The bias corrections 1 - beta^t use each Stiefel parameter's own step count t, also when
    parameters of one shape are updated together in one batched operation.

    Raises
    ------
    ValueError
        As for :class:`CayleySGD`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        feasibility_tol: float = 5e-6,
        check_every: int = 100,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                feasibility_tol=feasibility_tol,
                check_every=check_every,
            ),
        )

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        super()._check_hyperparameters(group, where)
        betas = group["betas"]
        try:
            b1, b2 = betas
            _number("beta", b1, low=0, high=1)
            _number("beta", b2, low=0, high=1)
        except (TypeError, ValueError):
            raise ValueError(f"{where}betas must be two numbers in [0, 1); got {betas!r}") from None
        group["betas"] = (float(b1), float(b2))
        _number(f"{where}eps", group["eps"], low=0, low_open=True)

    def _stiefel_update(self, group, X, xi, M, V, t):
        b1, b2 = group["betas"]
        M = b1 * M + (1 - b1) * xi
        V = b2 * V + (1 - b2) * xi.square().mean(dim=(-2, -1))
        step = group["lr"] / (1 - b1**t)  # per matrix: t is each parameter's own step count
        denom = (V / (1 - b2**t)).sqrt() + group["eps"]
        Y = stiefel.retr_cayley(X, -(step / denom)[:, None, None] * M)
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


class CayleyRMSprop(_CayleyBase):
    r"""RMSprop; Stiefel groups move by the Cayley retraction with a per-matrix RMSprop step.

    Non-Stiefel groups get exactly the update of :class:`torch.optim.RMSprop` without momentum
    and not centred (Tieleman & Hinton 2012, lecture 6.5; the optimiser of expRNN,
    Lezcano-Casado & Martinez-Rubio, ICML 2019): v <- alpha v + (1 - alpha) g^2,
    p <- p - lr g / (sqrt(v) + eps), no bias correction.

    A Stiefel matrix X moves as Li, Fuxin & Todorovic (ICLR 2020) Alg. 2 does with
    beta1 = 0 and, as torch's RMSprop, no bias correction: with ξ = P_X(G),
    v <- alpha v + (1 - alpha) mean(ξ²) (one scalar per matrix, so that the step stays a
    tangent vector: a per-entry scale would leave the tangent space), then
    X <- R_X(-lr ξ / (sqrt(v) + eps)) (Cayley retraction).

    Parameters
    ----------
    params : iterable of Tensor or dict
        Param groups; ``{"params": [...], "stiefel": True}`` marks Stiefel parameters.
    lr : float
        Learning rate (>= 0).
    alpha : float
        Smoothing constant of the squared-gradient average, in [0, 1).
    eps : float
        Denominator term (> 0).
    weight_decay : float
        L2 penalty (>= 0) of the Euclidean groups; see :class:`CayleySGD`.
    feasibility_tol, check_every
        As for :class:`CayleySGD`.

    Raises
    ------
    ValueError
        As for :class:`CayleySGD`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        feasibility_tol: float = 5e-6,
        check_every: int = 100,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                feasibility_tol=feasibility_tol,
                check_every=check_every,
            ),
        )

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        super()._check_hyperparameters(group, where)
        _number(f"{where}alpha", group["alpha"], low=0, high=1)
        _number(f"{where}eps", group["eps"], low=0, low_open=True)

    def _stiefel_update(self, group, X, xi, M, V, t):
        a = group["alpha"]
        V = a * V + (1 - a) * xi.square().mean(dim=(-2, -1))
        Y = stiefel.retr_cayley(X, -(group["lr"] / (V.sqrt() + group["eps"]))[:, None, None] * xi)
        return Y, M, V  # no momentum: M stays zero

    def _euclidean(self, group, p):
        g = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["square_avg"] = torch.zeros_like(p)
        st["step"] += 1
        st["square_avg"].mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
        p.addcdiv_(g, st["square_avg"].sqrt().add_(group["eps"]), value=-group["lr"])
