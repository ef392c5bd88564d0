r"""``StiefelLSTM``, ``StiefelGRU``, ``StiefelRNN``: PyTorch's recurrent modules with every
recurrent weight dissolved onto the Stiefel manifold (CDOpt's ``LSTM_cdopt``, ``GRU_cdopt``,
``RNN_cdopt`` with ``stiefel_torch``).

Each class *is* the corresponding ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: same constructor
arguments, same parameters under the same names and shapes (so state dicts are
interchangeable with the plain module and with CDOpt's layer), same inputs and outputs, and
the same fused kernels (cuDNN on GPU, the fused CPU kernel otherwise; never a Python loop
over time).  The only difference: the recurrent weights ``weight_hh_l{k}[_reverse]`` are the
raw weights W that the optimiser moves, and the kernel receives A(W) = W (3/2 I - 1/2 W^T W)
of all of them, computed in one batched operation on every forward; ``cdcore.quad_penalty``
adds penalty_param * sum ||W^T W - I||_F^2 to the loss (Xiao, Liu, Toh, arXiv:2203.10319;
Hu, Xiao, Liu, Toh, arXiv:2205.10500).

What the classes guarantee (tested in tests/test_rnn.py and, against a from-scratch
reference over random sequences of operations, tests/test_rnn_stateful.py):

* nothing stale is ever handed out: every ``quad_penalty`` call and every forward with
  autograd recomputes from the current weights, whatever changed them (optimisers, fused or
  not, ``.data``, ``copy_``, ``set_``, ``load_state_dict``, ``.to()``); the one cache, A(W) for
  no-grad forwards on CPU, is keyed on the bits of the raw weights (see ``_NoGradCache``);
* every parameter behaves as in the plain module: ``torch.func.functional_call`` with any
  subset of parameters swapped, parametrisations registered on non-recurrent weights,
  ``torch.func`` transforms, ``torch.compile``, ``torch.jit.trace``;
* mixed precision: the constraint arithmetic runs in float32 (float64 for float64 weights)
  with autocast disabled, so under ``torch.autocast`` the module behaves like the plain module
  holding A(W) under the same autocast.

Refused, with a ValueError: ``proj_size`` (the LSTM's projection changes the recurrent
weight's shape), ``granularity="per_gate"`` for ``StiefelRNN`` (no gates);
``torch.jit.script`` raises a RuntimeError that says why (trace or compile instead, or
script the exported plain module).
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .constrain import DissolvedOwner, DissolvedWeight
from .dissolving import (
    _autocast_off,
    check_granularity,
    check_penalty_param,
    compute_dtype,
    dissolve_blocks,
    from_blocks,
    project,
    quad_penalty_blocks,
    to_blocks,
    warn_zero_penalty,
)

__all__ = ["StiefelGRU", "StiefelLSTM", "StiefelRNN"]

# Note [flat-weight swap]
# ~~~~~~~~~~~~~~~~~~~~~~~
# torch.nn.modules.rnn.RNNBase (the base of nn.LSTM, nn.GRU, nn.RNN) hands its fused kernel
# (torch._VF.lstm / gru / rnn_tanh / rnn_relu) the list ``self._flat_weights``, whose order is
# ``self._flat_weights_names``.  Both are private; so are the two methods that maintain the
# list.  The Stiefel modules reuse nn's forward (input checks, packed sequences, unbatched
# input, hidden-state permutation: about 100 lines per cell that we do not copy) and rely on
# these four internals as follows (read against torch 2.11-2.14):
#
# * ``_flat_weights_names``: the parameter names in the kernel's order; read at construction
#   to find the recurrent weights (``weight_hh_l*``) and their positions.  If torch renamed it,
#   construction fails with an AttributeError (loud).
# * ``_flat_weights``: nn's forward passes it to the kernel and reads its first entry's dtype
#   in ``check_input``.  Our ``forward`` builds a fresh list on every call, ``getattr(self,
#   name)`` for every name (so ``torch.func.functional_call`` swaps and parametrisations of any
#   weight are honoured) with the recurrent entries replaced by A(W) of all of them in one
#   batched operation, puts it in ``self._flat_weights`` for the duration of
#   ``super().forward`` and restores the previous list in a ``finally``.  The list's entries
#   are views of one fresh buffer per forward (``_Layout``: cuDNN's offsets, read from a
#   flattened template module, on CUDA; a concatenation elsewhere), built by one ``torch.cat``
#   inside one autograd.Function with A(W)'s closed-form vjp, so that cuDNN's
#   ``try_get_weight_buf`` accepts the list in place and copies nothing; where that layout
#   cannot be met (a tensor subclass, mixed dtypes or devices) the previous per-weight list
#   is used, with a warning once per module and ``weight_path`` saying why.  If torch stopped
#   reading ``_flat_weights`` in forward, the kernel would see the raw weights and the model
#   would silently run unconstrained: test_forward_equals_plain_module_holding_A and the
#   stateful differential test fail then.  Outside forward the list is read only by
#   ``flatten_parameters`` (on CUDA it compacts the raw leaves into one buffer: harmless and
#   useless, since the kernel receives the fresh buffer above) and by pickling.  Mutating it
#   makes concurrent forwards of one module from several threads unsafe, as nn's own
#   ``_update_flat_weights`` does.
# * ``_update_flat_weights`` (overridden: a no-op): nn's forward calls it first; it compares the
#   weak references in ``_flat_weight_refs`` with ``getattr(self, name)`` and, when they differ
#   (functional_call, a parametrised weight), rebuilds ``_flat_weights`` by getattr, which
#   would overwrite our list and hand the kernel the raw recurrent weights.  If torch renamed
#   it, the override would be dead and nn's rebuild would run: the functional_call and
#   weight_norm tests (test_functional_call_honours_every_parameter,
#   test_parametrisation_on_input_weight_is_honoured) fail then.
# * ``_init_flat_weights`` (overridden, and called from ``__setstate__``): nn calls it from
#   ``__init__`` and ``_apply`` (``.to()``, ``.double()``, ``.cuda()``) and stores
#   ``getattr(self, name)``, which for a parametrised weight evaluates the parametrisation and
#   keeps a non-leaf tensor with its graph on the module between forwards (``copy.deepcopy``
#   then fails).  Ours stores only the registered leaves (None for a parametrised name) and
#   the weak references that nn's ``__getstate__`` deletes.  If torch renamed it, nn's
#   version would run again: no effect on results (forward never uses the stored list), but
#   test_deepcopy_and_pickle_with_parametrised_input_weight fails.


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _NoGradCache:
    """A(W) of the last forward without autograd, handed out only for bitwise-identical raw weights.

    The key is the *content* of the stacked raw weights: a lookup compares the current stack
    bit for bit (integer views, so NaN and -0.0 count as themselves) with the stack the value
    was computed from, plus shape, dtype, device and granularity.  Version counters and data
    pointers are not trusted: fused and foreach optimisers, ``.data`` and ``set_`` change
    weights without bumping them.  A hit therefore returns exactly what recomputation from the
    same bits gives (the same deterministic operations on the same input).

    Used only when nothing could observe the difference or need a graph: grad mode off, no
    ``torch.func`` transform active, not while ``torch.compile`` or ``torch.jit.trace`` traces
    (a hit would record A(W) as a constant), and a plain tensor (no subclass: fake,
    functional, distributed tensors); under ``torch.inference_mode`` it works like
    ``no_grad`` (inference tensors are only ever read).  CPU only: on a GPU the comparison
    would make the host wait for the device on every forward, which can cost more than the
    batched A(W) it saves; on a 2-core CPU it buys 7% of an evaluation step at hidden 100 and
    14% at hidden 256 (2-layer biLSTM, batch 64, 28 steps).  Holds two copies of the
    recurrent weights.  Never copied: ``copy.deepcopy`` and pickling give an empty cache.
    """

    __slots__ = ("key", "stack", "value")

    def __init__(self) -> None:
        self.key = self.stack = self.value = None

    @staticmethod
    def applicable(stack: Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and type(stack) is Tensor
            and stack.device.type == "cpu"
            and not torch.jit.is_tracing()
            and stack.element_size() in _BITS
            and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling()
        )

    @staticmethod
    def _key(stack: Tensor, granularity: str):
        return stack.shape, stack.dtype, stack.device, granularity

    def get(self, stack: Tensor, granularity: str) -> Tensor | None:
        if self.value is None or self.key != self._key(stack, granularity):
            return None
        bits = _BITS[stack.element_size()]
        return self.value if torch.equal(self.stack.view(bits), stack.view(bits)) else None

    def put(self, stack: Tensor, granularity: str, value: Tensor) -> None:
        self.key, self.stack, self.value = self._key(stack, granularity), stack, value

    def __reduce__(self):
        return _NoGradCache, ()


# -- the flat weight buffer: See Note [flat-weight swap] -------------------------------------------
class _Layout(NamedTuple):
    """Where each weight of the kernel's list lives in one flat buffer.

    ``offsets[i]`` is the element offset of the i-th weight of ``_flat_weights_names`` and
    ``shapes[i]`` its shape (contiguous); ``total`` the buffer's length in elements.  ``order``
    lists the weights by offset and ``gaps[j]`` the unused elements before the j-th of them
    (``gaps[-1]``: after the last), so that one ``torch.cat`` builds the buffer.
    """

    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    total: int
    order: tuple[int, ...]
    gaps: tuple[int, ...]

    @classmethod
    def from_offsets(cls, offsets, shapes, total) -> _Layout:
        order = tuple(sorted(range(len(offsets)), key=offsets.__getitem__))
        gaps, end = [], 0
        for i in order:
            numel = _numel(shapes[i])
            if offsets[i] < end:
                raise ValueError(f"overlapping weights in the layout at offset {offsets[i]}")
            gaps.append(offsets[i] - end)
            end = offsets[i] + numel
        if total < end:
            raise ValueError(f"layout of {total} elements is shorter than its weights ({end})")
        gaps.append(total - end)
        return cls(tuple(offsets), tuple(map(tuple, shapes)), int(total), order, tuple(gaps))

    @classmethod
    def concatenated(cls, shapes) -> _Layout:
        """The weights one after the other in the kernel's order (any layout works off cuDNN)."""
        offsets, end = [], 0
        for shape in shapes:
            offsets.append(end)
            end += _numel(shape)
        return cls.from_offsets(offsets, shapes, end)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


#: torch < 2.12: Dynamo raises an internal error (sympy) tracing the flat no-grad path
_OLD_DYNAMO = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12)

#: (plain class, configuration, dtype, device, cuDNN enabled) -> _Layout or a fallback reason
_LAYOUTS: dict[tuple, _Layout | str] = {}


def _cudnn_layout(module: nn.RNNBase, plain: type[nn.RNNBase], config: dict, dtype, device) -> _Layout | str:
    """The layout cuDNN expects for this configuration: the offsets at which
    ``nn.RNNBase.flatten_parameters`` puts the weights of a template module (weights left
    uninitialised, so no random number is drawn), or the concatenation when cuDNN would not be
    used (``flatten_parameters`` leaves the weights apart exactly when the kernel takes
    another path: cuDNN disabled, or not acceptable for the dtype).  A reason string where
    the template's flat weights do not form the layout ``try_get_weight_buf`` accepts."""
    template = torch.nn.utils.skip_init(plain, **config, device=device, dtype=dtype)
    template.flatten_parameters()
    weights = [getattr(template, n) for n in template._flat_weights_names]
    shapes = [tuple(w.shape) for w in weights]
    storage = weights[0].untyped_storage()
    if any(w.untyped_storage().data_ptr() != storage.data_ptr() for w in weights):
        return _Layout.concatenated(shapes)  # not flattened: the kernel is not cuDNN's
    if not all(w.is_contiguous() for w in weights):
        return f"cuDNN's flattened weights of a template nn.{plain.__name__} are not contiguous"
    try:
        return _Layout.from_offsets(
            [w.storage_offset() for w in weights], shapes, storage.nbytes() // weights[0].element_size()
        )
    except ValueError as e:
        return f"cuDNN's layout of a template nn.{plain.__name__}: {e}"


def _layout(module, weights: list[Tensor]) -> _Layout | str:
    """The layout of ``module``'s kernel weights (cached per configuration, dtype and device), or
    the reason the flat path cannot be taken.  Host-side only: never waits for the device."""
    if _OLD_DYNAMO and not torch.is_grad_enabled() and torch.compiler.is_compiling():
        return "torch.compile of a no-grad forward on torch < 2.12 (Dynamo fails on the flat buffer there)"
    first = weights[0]
    for name, w in zip(module._flat_weights_names, weights):
        if not isinstance(w, Tensor):
            return f"{name} is not a tensor ({type(w).__name__})"
        if type(w) not in (Tensor, nn.Parameter) and not isinstance(w, nn.Parameter):
            return f"{name} is a tensor subclass ({type(w).__name__})"
        if w.dtype != first.dtype:
            return f"weights of two dtypes ({first.dtype}, {name} {w.dtype})"
        if w.device != first.device:
            return f"weights on two devices ({first.device}, {name} {w.device})"
        if w.layout != torch.strided:
            return f"{name} has layout {w.layout}"
    config = module._config(module)
    key = (
        module._plain,
        tuple(sorted(config.items())),
        first.dtype,
        first.device,
        torch.backends.cudnn.enabled,
    )
    layout = _LAYOUTS.get(key)
    if layout is None:
        if first.device.type == "cuda":
            layout = _cudnn_layout(module, module._plain, config, first.dtype, first.device)
        else:
            layout = _Layout.concatenated([tuple(w.shape) for w in weights])
        _LAYOUTS[key] = layout
    if isinstance(layout, _Layout) and any(tuple(w.shape) != s for w, s in zip(weights, layout.shapes)):
        return "a weight's shape differs from the module's configuration"
    return layout


#: (device, dtype, size) -> identity matrix, built once
_EYES: dict[tuple, Tensor] = {}


def _eye(p: int, like: Tensor) -> Tensor:
    """The p x p identity of ``like``'s dtype and device, cached (not while tracing or compiling,
    where a cached tensor would be a fake or traced one)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(like) is not Tensor:
        return torch.eye(p, dtype=like.dtype, device=like.device)
    key = (like.device, like.dtype, p)
    eye = _EYES.get(key)
    if eye is None:
        with torch.inference_mode(False), torch.no_grad():
            eye = _EYES[key] = torch.eye(p, dtype=like.dtype, device=like.device)
    return eye


def _gram(X: Tensor) -> Tensor:
    """C = X^T X - I of a batch (m, n, p): one batched product with the cached identity."""
    return torch.baddbmm(_eye(X.shape[-1], X), X.transpose(-2, -1), X, beta=-1)


def _stack_blocks(raw: list[Tensor], granularity: str) -> Tensor:
    """The raw recurrent weights as one batch (m, n, p) of the constraint's blocks, in
    :func:`cdcore.dissolving.compute_dtype` (one ``stack``; the cast only for half precision)."""
    X = to_blocks(torch.stack(raw), granularity).flatten(0, 1)
    return X.to(compute_dtype(X.dtype))


def flat_dissolve(
    layout: _Layout,
    weights: list[Tensor],
    index: tuple[int, ...],
    granularity: str,
    penalty_param: float | None,
    effective: Tensor | None = None,
):
    r"""The kernel's weight list as views of one fresh flat buffer, recurrent weights as A(W).

    The arithmetic of :class:`_FlatDissolve` (and of no-grad forwards, which skip autograd): the
    recurrent weights ``weights[i]`` for i in ``index`` are stacked into one batch X of the
    constraint's blocks (:func:`cdcore.dissolving.to_blocks`), C = X^T X - I is formed with one
    batched product and A(X) = X - 1/2 X C with a second ([XLT22]_ of
    :mod:`cdcore.dissolving`: A(X) = X (3/2 I - 1/2 X^T X)); then one ``torch.cat`` writes A and
    every other weight, as given, into a new buffer in ``layout`` and the weights are returned
    as views of it.

    Parameters
    ----------
    layout : _Layout
    weights : list of Tensor
        Every weight in the kernel's order (``_flat_weights_names``), one dtype and device.
    index : tuple of int
        Positions of the recurrent weights, each (g H, H).
    granularity : {"stacked", "per_gate"}
    penalty_param : float or None
        None: no penalty is computed.
    effective : Tensor, optional
        A(W) already known (shape (k, g H, H), the weights' dtype; the no-grad cache): no
        arithmetic then, and X, C and the penalty are None.

    Returns
    -------
    slots : list of Tensor
        Views of one buffer of ``layout.total`` elements of the weights' dtype, at
        ``layout.offsets`` (contiguous): what cuDNN's ``try_get_weight_buf`` uses in place.
    penalty : Tensor or None
        penalty_param * sum ||C||_F^2, 0-dim, :func:`cdcore.dissolving.compute_dtype`.
    X, C : Tensor or None
        The blocks (m, n, p) and their C (m, p, p), for the backward.
    """
    dtype = weights[0].dtype
    X = C = penalty = None
    if effective is None:
        X = _stack_blocks([weights[i] for i in index], granularity)
        C = _gram(X)
        A = torch.baddbmm(X, X, C, alpha=-0.5)  # X - X C / 2
        if penalty_param is not None:
            flat = C.reshape(-1)
            penalty = torch.dot(flat, flat) * penalty_param
        effective = from_blocks(A.reshape(len(index), -1, *A.shape[-2:]), granularity)
    effective = effective.to(dtype)
    pieces = list(weights)
    for i, a in zip(index, effective.unbind(0)):
        pieces[i] = a
    parts = []
    for gap, i in zip(layout.gaps, layout.order):
        if gap:
            parts.append(weights[0].new_empty(gap))
        parts.append(pieces[i].reshape(-1))
    if layout.gaps[-1]:
        parts.append(weights[0].new_empty(layout.gaps[-1]))
    buf = torch.cat(parts)
    slots = [
        buf.as_strided(shape, _contiguous_strides(shape), offset)
        for shape, offset in zip(layout.shapes, layout.offsets)
    ]
    return slots, penalty, X, C


def _user_stacklevel() -> int:
    """``stacklevel`` pointing at the first frame outside cdcore and torch (the module's caller)."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def flat_dissolve_vjp(
    X: Tensor, C: Tensor, grad_A: Tensor | None, grad_penalty: Tensor | None, penalty_param: float
) -> Tensor:
    r"""The gradient with respect to the blocks X of <G, A(X)> + g penalty_param sum ||C||_F^2.

    The closed form of :func:`cdcore.dissolving.dissolve_vjp` with the penalty's weight folded
    in, in four batched operations (three with ``grad_penalty`` None):

    .. math::
        \nabla = G (I - \tfrac12 C) - \tfrac12 X \left(X^T G + G^T X - 8 g\,
        \mathrm{penalty\_param}\, C\right)

    ([XLT22]_ of :mod:`cdcore.dissolving`, Sec. 4: the Jacobian of A is self-adjoint; 4 X C is
    the gradient of ||C||_F^2).

    Parameters
    ----------
    X : Tensor, shape (m, n, p)
    C : Tensor, shape (m, p, p)
    grad_A : Tensor of shape (m, n, p), or None for zero
    grad_penalty : 0-dim Tensor, or None for zero
    penalty_param : float

    Returns
    -------
    Tensor, shape (m, n, p), dtype of ``X``
    """
    if grad_A is None:
        return torch.bmm(X, C * (grad_penalty * (4.0 * penalty_param)))
    M = torch.bmm(X.transpose(-2, -1), grad_A)
    S = M + M.transpose(-2, -1)
    if grad_penalty is not None:
        S = torch.addcmul(S, C, grad_penalty, value=-8.0 * penalty_param)
    return torch.baddbmm(torch.baddbmm(grad_A, grad_A, C, alpha=-0.5), X, S, alpha=-0.5)


class _FlatDissolve(torch.autograd.Function):
    """:func:`flat_dissolve` with autograd: the slots' gradients pass through to their weights,
    the recurrent slots' through the closed-form vjp of A (:func:`flat_dissolve_vjp`) to the raw W.

    Inputs ``(layout, index, granularity, penalty_param, *weights)``; outputs ``(*slots, X, C)``
    and the penalty last when ``penalty_param`` is not None (X, the stacked blocks, and C are
    returned so that ``setup_context`` can save them; the caller drops them; C is not
    differentiable).  Nothing of the weights themselves is saved, so they may change between
    the forward and the backward (an optimiser step), as with the plain kernel's own copies.  A
    fresh buffer per call: two forwards before one backward each keep their own.
    Differentiable again: a recorded backward recomputes C from the saved X, an output whose
    own gradient passes back to the raw W.
    ``vmap``: the generated rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(layout, index, granularity, penalty_param, *weights):
        with _autocast_off(weights[0]):
            slots, penalty, X, C = flat_dissolve(layout, list(weights), index, granularity, penalty_param)
        return (*slots, X, C) + ((penalty,) if penalty is not None else ())

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, index, granularity, penalty_param, *weights = inputs
        n = len(weights)
        X, C = output[n], output[n + 1]
        ctx.mark_non_differentiable(C)
        ctx.save_for_backward(X, C)  # X is an output: a recorded backward differentiates through it
        ctx.meta = (n, index, granularity, penalty_param, weights[0].dtype)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        n, index, granularity, penalty_param, dtype = ctx.meta
        X, C = ctx.saved_tensors
        slot_grads = list(grads[:n])
        grad_X_out = grads[n]
        grad_penalty = grads[n + 2] if penalty_param is not None else None
        rec = [slot_grads[i] for i in index]
        out = [None] * 4 + slot_grads
        for i in index:
            out[4 + i] = None
        if grad_penalty is None and grad_X_out is None and all(g is None for g in rec):
            return tuple(out)
        with _autocast_off(X):
            if torch.is_grad_enabled():  # a recorded backward: C as a function of X (and so of W)
                C = _gram(X)
            grad_X = None
            if grad_penalty is not None or not all(g is None for g in rec):
                G = None
                if not all(g is None for g in rec):
                    like = next(g for g in rec if g is not None)
                    G = torch.stack([torch.zeros_like(like) if g is None else g for g in rec])
                    G = to_blocks(G, granularity).flatten(0, 1).to(X.dtype)
                grad_X = flat_dissolve_vjp(X, C, G, grad_penalty, penalty_param or 0.0)
            if grad_X_out is not None:
                grad_X = grad_X_out if grad_X is None else grad_X + grad_X_out
        grad_W = from_blocks(grad_X.reshape(len(index), -1, *grad_X.shape[-2:]), granularity).to(dtype)
        for i, g in zip(index, grad_W.unbind(0)):
            out[4 + i] = g
        return tuple(out)


class _StiefelRNNBase(DissolvedOwner):
    """The machinery shared by the three cells; a mixin in front of nn.LSTM / nn.GRU / nn.RNN.

    A subclass sets ``_plain`` (the plain class), checks its arguments with
    :meth:`_check_arguments` before building the plain module (so a bad argument draws no
    random numbers) and calls :meth:`_dissolve_recurrent` at the end of its constructor.
    """

    _plain: type[nn.RNNBase]

    # -- construction ----------------------------------------------------------------
    @classmethod
    def _check_arguments(cls, penalty_param, granularity, proj_size=0) -> None:
        check_penalty_param(penalty_param)
        check_granularity(granularity)
        if proj_size:
            raise ValueError(
                f"proj_size must be 0 for a {cls.__name__} (it has no projection); got {proj_size!r}"
            )

    def _dissolve_recurrent(self, penalty_param: float, granularity: str) -> None:
        self.penalty_param = float(penalty_param)
        self.granularity = granularity
        self.dissolved_names = [n for n in self._flat_weights_names if n.startswith("weight_hh_l")]
        self._dissolved_index = [self._flat_weights_names.index(n) for n in self.dissolved_names]
        self._no_grad_cache = _NoGradCache()
        with torch.no_grad():
            for name in self.dissolved_names:
                weight = getattr(self, name)
                weight.copy_(project(weight, granularity))
        if self.penalty_param == 0:
            warn_zero_penalty(f"the recurrent weights of a {type(self).__name__}")

    @staticmethod
    def _config(module: nn.RNNBase) -> dict:
        """Constructor arguments of a recurrent module (without penalty, device, dtype)."""
        config = dict(
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if module.mode in ("RNN_TANH", "RNN_RELU"):
            config["nonlinearity"] = module.nonlinearity
        return config

    # -- nn.RNNBase internals: See Note [flat-weight swap] ------------------------------
    def _init_flat_weights(self) -> None:
        # See Note [flat-weight swap]
        self._flat_weights = [self._parameters.get(n) for n in self._flat_weights_names]
        self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]
        self.flatten_parameters()

    def _update_flat_weights(self) -> None:
        pass  # See Note [flat-weight swap]

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._init_flat_weights()  # See Note [flat-weight swap]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # state dicts written before the raw weights became plain parameters (cdbench <= 0.1.0
        # kept them under torch parametrize) name them parametrizations.<name>.original
        for name in self.dissolved_names:
            old = f"{prefix}parametrizations.{name}.original"
            if old in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be scripted with torch.jit.script (its forward computes A(W) "
            f"in an autograd.Function); use torch.jit.trace or torch.compile, or script the plain module "
            f"that to_plain() exports"
        )

    def forward(self, input, hx=None):
        """As the plain module's forward, with A(W) of every recurrent weight: ``(output, h_n)``
        (``(output, (h_n, c_n))`` for the LSTM).  See :meth:`forward_with_penalty`."""
        out, hidden, _ = self._forward(input, hx, None)
        return out, hidden

    def forward_with_penalty(self, input, hx=None):
        """The forward and the penalty from the forward's own Gram matrices: ``(output, hidden, penalty)``.

        ``output`` and ``hidden`` are what :meth:`forward` returns; ``penalty`` is
        penalty_param * sum over recurrent weights of ||W^T W - I||_F^2 (what
        :func:`cdcore.quad_penalty` gives for this module, up to rounding), computed from the
        C = W^T W - I that the forward forms for A(W) anyway, so a training step pays for one
        Gram matrix per weight instead of two.  Nothing is kept on the module: each call's
        penalty has its own graph, like its output.

        Returns
        -------
        output, hidden
            As for the plain module.
        penalty : Tensor, 0-dim, float32 (float64 for float64 weights)
            With autograd history when grad mode is on (its gradient 4 penalty_param W C is
            formed in closed form in the forward's backward).
        """
        out, hidden, penalty = self._forward(input, hx, self.penalty_param)
        if penalty is None:  # the fallback path, or a no-grad cache hit: recompute
            penalty = self.dissolved_penalty()
        return out, hidden, penalty

    def _forward(self, input, hx, penalty_param):
        weights, penalty = self._kernel_weights(penalty_param)
        stored, self._flat_weights = self._flat_weights, weights  # See Note [flat-weight swap]
        try:
            out, hidden = super().forward(input, hx)
        finally:
            self._flat_weights = stored  # See Note [flat-weight swap]
        return out, hidden, penalty

    @property
    def weight_path(self) -> str:
        """How the next forward hands the kernel its weights: ``"flat"`` (views of one fresh
        buffer in the kernel's layout, see Note [flat-weight swap] in :mod:`cdcore.rnn`) or
        ``"fallback: <reason>"`` (each A(W) in its own storage, as cdbench 0.1.0 did; on CUDA
        cuDNN then copies every weight on every forward).  Decided from the weights' types,
        dtypes and devices alone (host-side)."""
        layout = _layout(self, [getattr(self, n) for n in self._flat_weights_names])
        return "flat" if isinstance(layout, _Layout) else f"fallback: {layout}"

    def _kernel_weights(self, penalty_param=None) -> tuple[list[Tensor], Tensor | None]:
        """The kernel's weight list (every weight as the module sees it, recurrent ones as A(W))
        and, when ``penalty_param`` is given and the flat path computed it, the penalty."""
        weights = [getattr(self, n) for n in self._flat_weights_names]  # See Note [flat-weight swap]
        layout = _layout(self, weights)
        if not isinstance(layout, _Layout):
            self._warn_fallback(layout)
            return self._kernel_weights_apart(weights), None
        index = tuple(self._dissolved_index)
        if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
            *slots, _, _, penalty = _FlatDissolve.apply(
                layout, index, self.granularity, penalty_param, *weights
            ) + ((None,) if penalty_param is None else ())
            return slots, penalty
        raw = torch.stack([weights[i] for i in index])  # the cache's key: a fresh tensor
        cacheable = _NoGradCache.applicable(raw)
        cached = self._no_grad_cache.get(raw, self.granularity) if cacheable else None
        with _autocast_off(raw):
            slots, penalty, _, _ = flat_dissolve(
                layout,
                weights,
                index,
                self.granularity,
                None if cached is not None else penalty_param,
                cached,
            )
        if cacheable and cached is None:
            self._no_grad_cache.put(raw, self.granularity, torch.stack([slots[i] for i in index]))
        return slots, penalty

    def _kernel_weights_apart(self, weights: list[Tensor]) -> list[Tensor]:
        """The fallback: A(W) of all recurrent weights in one batched operation, each in its own storage."""
        raw = torch.stack([weights[i] for i in self._dissolved_index])  # a fresh tensor: nobody else holds it
        cacheable = _NoGradCache.applicable(raw)
        effective = self._no_grad_cache.get(raw, self.granularity) if cacheable else None
        if effective is None:
            effective, _ = dissolve_blocks(raw, self.granularity)
            if cacheable:
                self._no_grad_cache.put(raw, self.granularity, effective)
        for i, w in zip(self._dissolved_index, effective.unbind(0)):
            weights[i] = w
        return weights

    def _warn_fallback(self, reason: str) -> None:
        """Warn once per module (at the caller's line) that the kernel gets its weights apart."""
        if getattr(self, "_fallback_warned", None) == reason:
            return
        self._fallback_warned = reason
        warnings.warn(
            f"{type(self).__name__}: the fused kernel gets its weights apart, not in one flat buffer "
            f"({reason}); on CUDA cuDNN then copies every weight on every forward",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )

    # -- the constraint --------------------------------------------------------------------
    def _raw_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.dissolved_names]

    def effective_weights(self) -> tuple[list[Tensor], Tensor]:
        """A(W) of every recurrent weight and the total penalty, recomputed now in one batched operation.

        Exactly the recurrent weights the next forward hands the kernel, and the value
        :func:`cdcore.quad_penalty` gives for this module (sharing one Gram matrix per weight).

        Returns
        -------
        weights : list of Tensor, each (g H, H), dtype of the raw weights
            A(W) in the order of ``dissolved_names`` (g = 4 LSTM, 3 GRU, 1 RNN), with autograd
            history when grad mode is on.
        penalty : Tensor, 0-dim, float32 (float64 for float64 weights)
            penalty_param * sum over weights of ||W^T W - I||_F^2 (against the granularity).
        """
        A, sq = dissolve_blocks(torch.stack(self._raw_weights()), self.granularity)
        return list(A.unbind(0)), self.penalty_param * sq.sum()

    def dissolved(self) -> list[DissolvedWeight]:
        """The recurrent weights as :class:`cdcore.DissolvedWeight` (names relative to this module)."""
        return [
            DissolvedWeight(n, w, self.granularity, self.penalty_param)
            for n, w in zip(self.dissolved_names, self._raw_weights())
        ]

    def dissolved_penalty(self) -> Tensor:
        """penalty_param * sum ||W^T W - I||_F^2 over the recurrent weights, recomputed now.

        One batched Gram matrix for all weights, its own autograd graph (closed-form gradient
        4 penalty_param W C); any number of calls per forward, any backward order.  float32
        (float64 for float64 weights).
        """
        return (
            self.penalty_param * quad_penalty_blocks(torch.stack(self._raw_weights()), self.granularity).sum()
        )

    # -- import / export ---------------------------------------------------------------
    @classmethod
    def from_plain(cls, module: nn.RNNBase, *, penalty_param: float, granularity: str = "stacked"):
        """A module of this class with the weights of the plain ``module``, recurrent ones projected.

        Every recurrent weight is replaced by its polar factor (nearest point of the
        manifold, per gate block for ``"per_gate"``), where A is the identity, so the
        result computes what ``module`` would with exactly feasible recurrent weights; all
        other weights are copied (as the module sees them, i.e. after its own
        parametrisations).  Same device, dtype and training / evaluation mode (``module.training``:
        an exported evaluation-mode model keeps its dropout off).  The global random stream is left
        exactly as it was (the throw-away initial weights are drawn under
        :func:`torch.random.fork_rng`).

        Raises
        ------
        ValueError
            ``module`` is not a ``cls._plain`` (e.g. an ``nn.GRU`` given to StiefelLSTM),
            uses ``proj_size``, or bad ``penalty_param`` / ``granularity``.
        """
        if not isinstance(module, cls._plain):
            raise ValueError(
                f"{cls.__name__} converts an nn.{cls._plain.__name__}; got {type(module).__name__}"
            )
        cls._check_arguments(penalty_param, granularity, getattr(module, "proj_size", 0))
        ref = next(module.parameters())
        with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
            out = cls(
                **cls._config(module),
                penalty_param=penalty_param,
                granularity=granularity,
                device=ref.device,
                dtype=ref.dtype,
            )
        with torch.no_grad():
            for name in out._flat_weights_names:
                src = getattr(module, name)
                out._parameters[name].copy_(project(src, granularity) if name in out.dissolved_names else src)
        return out.train(module.training)

    def to_plain(self) -> nn.RNNBase:
        """The plain module (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) with exactly feasible recurrent weights.

        Every recurrent weight is the polar factor of the raw weight (per gate block for
        ``"per_gate"``), not A(W): A(W) is only feasible up to O(||C(W)||^2).  All other
        weights are copied as the module sees them.  Same configuration, device, dtype and
        training / evaluation mode (``self.training``); the global random stream is left as it was.
        """
        ref = next(self.parameters())
        with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
            plain = self._plain(**self._config(self), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in self._flat_weights_names:
                src = getattr(self, name)
                getattr(plain, name).copy_(
                    project(src, self.granularity) if name in self.dissolved_names else src
                )
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", penalty_param={self.penalty_param}, granularity={self.granularity!r}"
        )


_SHARED_DOC = """
    Parameters
    ----------
    penalty_param : float
        Finite, >= 0 (0 warns once per module, at the caller's line); CDOpt's convention,
        beta / 2 of the papers.
    granularity : {{"stacked", "per_gate"}}
        ``"stacked"``: each ({g}H, H) recurrent weight on St({g}H, H) (CDOpt's choice).
        ``"per_gate"``: each of the {g} H x H gate blocks ({gates}) on O(H).
    device, dtype
        As for the plain module.

    Attributes
    ----------
    dissolved_names : list of str
        ``weight_hh_l{{k}}`` and ``weight_hh_l{{k}}_reverse``, in the kernel's order: the raw
        weights W, ordinary parameters of shape ({g}H, H) under nn's names.
    penalty_param : float
    granularity : str

    Raises
    ------
    ValueError
        Bad ``penalty_param`` or ``granularity``{extra}.

    Notes
    -----
    Inputs and outputs are those of the plain module: input (L, N, H_in), or (N, L, H_in)
    with ``batch_first``, or unbatched (L, H_in), or a PackedSequence; output (L, N, D H);
    final states (D num_layers, N, H).  The forward computes A(W) of every recurrent weight
    in one batched operation (in float32, or float64 for float64 weights, with autocast
    disabled; see :func:`cdcore.dissolving.dissolve_with_penalty`) and hands the fused kernel
    every other weight exactly as ``getattr`` returns it; ``cdcore.quad_penalty(model)``
    recomputes the penalty from the raw weights.  See the module docstring for the
    guarantees and what is refused.
"""


class StiefelLSTM(_StiefelRNNBase, nn.LSTM):
    __doc__ = r"""Multi-layer (bi)LSTM with every recurrent weight constrained by constraint dissolving.

    Drop-in for CDOpt's ``LSTM_cdopt(..., manifold_class=stiefel_torch, penalty_param=...)``
    and for :class:`torch.nn.LSTM` (arguments ``input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional`` as there).
""" + _SHARED_DOC.format(g=4, gates="i, f, g, o", extra="; ``proj_size`` other than 0")

    _plain = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        penalty_param: float,
        granularity: str = "stacked",
        device=None,
        dtype=None,
    ) -> None:
        self._check_arguments(penalty_param, granularity, proj_size)
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._dissolve_recurrent(penalty_param, granularity)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, penalty_param: float, granularity: str = "stacked") -> StiefelLSTM:
        """:meth:`from_plain` for an ``nn.LSTM`` (``proj_size`` refused with ValueError)."""
        return cls.from_plain(lstm, penalty_param=penalty_param, granularity=granularity)

    def to_lstm(self) -> nn.LSTM:
        """:meth:`to_plain`: a plain ``nn.LSTM`` with exactly feasible recurrent weights."""
        return self.to_plain()


class StiefelGRU(_StiefelRNNBase, nn.GRU):
    __doc__ = r"""Multi-layer (bi)GRU with every recurrent weight constrained by constraint dissolving.

    Drop-in for CDOpt's ``GRU_cdopt(..., manifold_class=stiefel_torch, penalty_param=...)``
    and for :class:`torch.nn.GRU` (arguments ``input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional`` as there).
""" + _SHARED_DOC.format(g=3, gates="r, z, n", extra="")

    _plain = nn.GRU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        penalty_param: float,
        granularity: str = "stacked",
        device=None,
        dtype=None,
    ) -> None:
        self._check_arguments(penalty_param, granularity)
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._dissolve_recurrent(penalty_param, granularity)

    @classmethod
    def from_gru(cls, gru: nn.GRU, *, penalty_param: float, granularity: str = "stacked") -> StiefelGRU:
        """:meth:`from_plain` for an ``nn.GRU``."""
        return cls.from_plain(gru, penalty_param=penalty_param, granularity=granularity)

    def to_gru(self) -> nn.GRU:
        """:meth:`to_plain`: a plain ``nn.GRU`` with exactly feasible recurrent weights."""
        return self.to_plain()


class StiefelRNN(_StiefelRNNBase, nn.RNN):
    __doc__ = r"""Multi-layer (bi)directional Elman RNN (tanh or relu) with orthogonal recurrent weights by
    constraint dissolving: each square ``weight_hh`` (H, H) on O(H) = St(H, H).

    Drop-in for CDOpt's ``RNN_cdopt(..., manifold_class=stiefel_torch, penalty_param=...)``
    and for :class:`torch.nn.RNN` (arguments ``input_size, hidden_size, num_layers,
    nonlinearity, bias, batch_first, dropout, bidirectional`` as there).  A vanilla RNN has
    no gates: ``granularity`` must be ``"stacked"`` (the default).
""" + _SHARED_DOC.format(g=1, gates="one block", extra="; ``granularity='per_gate'`` (no gates)")

    _plain = nn.RNN

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        penalty_param: float,
        granularity: str = "stacked",
        device=None,
        dtype=None,
    ) -> None:
        self._check_arguments(penalty_param, granularity)
        if granularity != "stacked":
            raise ValueError(
                f"StiefelRNN has no gates: granularity must be 'stacked' (each H x H recurrent weight on "
                f"O(H)); got {granularity!r}"
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            nonlinearity=nonlinearity,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._dissolve_recurrent(penalty_param, granularity)

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, *, penalty_param: float, granularity: str = "stacked") -> StiefelRNN:
        """:meth:`from_plain` for an ``nn.RNN`` (same nonlinearity)."""
        return cls.from_plain(rnn, penalty_param=penalty_param, granularity=granularity)

    def to_rnn(self) -> nn.RNN:
        """:meth:`to_plain`: a plain ``nn.RNN`` with exactly orthogonal recurrent weights."""
        return self.to_plain()
