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

import weakref

import torch
from torch import Tensor, nn

from .constrain import DissolvedOwner, DissolvedWeight
from .dissolving import (
    check_granularity,
    check_penalty_param,
    dissolve_blocks,
    project,
    quad_penalty_blocks,
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
#   ``super().forward`` and restores the previous list in a ``finally``.  If torch stopped
#   reading ``_flat_weights`` in forward, the kernel would see the raw weights and the model
#   would silently run unconstrained: test_forward_equals_plain_module_holding_A and the
#   stateful differential test fail then.  Outside forward the list is read only by
#   ``flatten_parameters`` (on CUDA it compacts the raw leaves into one buffer: harmless and
#   useless, since the kernel receives A(W), which cuDNN copies into its own buffer on every
#   call; it warns once that the weights "are not part of single contiguous chunk of memory",
#   as it does for CDOpt's layers) and by pickling.  Mutating it makes concurrent forwards of
#   one module from several threads unsafe, as nn's own ``_update_flat_weights`` does.
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
        weights = self._kernel_weights()
        stored, self._flat_weights = self._flat_weights, weights  # See Note [flat-weight swap]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = stored  # See Note [flat-weight swap]

    def _kernel_weights(self) -> list[Tensor]:
        """The kernel's weight list: every weight as the module sees it, recurrent ones as A(W)."""
        weights = [getattr(self, n) for n in self._flat_weights_names]  # See Note [flat-weight swap]
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
        parametrisations).  Same device and dtype.  The global random stream is left
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
        return out

    def to_plain(self) -> nn.RNNBase:
        """The plain module (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) with exactly feasible recurrent weights.

        Every recurrent weight is the polar factor of the raw weight (per gate block for
        ``"per_gate"``), not A(W): A(W) is only feasible up to O(||C(W)||^2).  All other
        weights are copied as the module sees them.  Same configuration, device and dtype;
        the global random stream is left as it was.
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
        return plain

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
