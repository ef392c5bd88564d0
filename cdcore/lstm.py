"""``StiefelLSTM``: an ``nn.LSTM`` whose recurrent weights are dissolved onto St(4H, H).

It keeps PyTorch's fused LSTM kernels (cuDNN on GPU, the fused CPU kernel otherwise):
the forward computes every effective recurrent weight A(W) in one batched operation,
hands the list of weights to ``torch._VF.lstm`` through ``nn.LSTM.forward`` and never
loops over time steps in Python.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .constrain import dissolve
from .dissolving import check_granularity, check_penalty_param, dissolve_with_penalty, from_blocks, project, to_blocks

__all__ = ["StiefelLSTM"]


class _ForwardPenalty:
    """The penalty computed alongside the last forward, keyed by the raw weights' versions.

    Never copied: ``copy.deepcopy`` of the module gets an empty cache.
    """

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key = None
        self.value = None

    def __deepcopy__(self, memo) -> "_ForwardPenalty":
        return _ForwardPenalty()


class _NoGradWeights:
    """A(W) from the last forward without autograd, valid while the raw weights are the
    same tensors (same objects, storage and version): evaluation reuses it across batches.

    Never copied: ``copy.deepcopy`` of the module gets an empty cache.
    """

    __slots__ = ("refs", "key", "value")

    def __init__(self) -> None:
        self.refs, self.key, self.value = (), None, None

    def get(self, raws):
        if self.value is None or len(raws) != len(self.refs) or any(r() is not w for r, w in zip(self.refs, raws)):
            return None
        return self.value if self.key == self._key(raws) else None

    def put(self, raws, value) -> None:
        self.refs = tuple(weakref.ref(w) for w in raws)
        self.key, self.value = self._key(raws), value

    @staticmethod
    def _key(raws):
        return tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in raws)

    def __deepcopy__(self, memo) -> "_NoGradWeights":
        return _NoGradWeights()


class StiefelLSTM(nn.LSTM):
    r"""Multi-layer (bi)LSTM with every recurrent weight constrained by constraint dissolving.

    Drop-in for CDOpt's ``LSTM_cdopt(..., manifold_class=stiefel_torch, penalty_param=...)``:
    each ``weight_hh_l{k}`` and ``weight_hh_l{k}_reverse`` (shape (4H, H)) is dissolved
    with :func:`cdcore.dissolve`, so the forward uses A(W) = W (3/2 I - 1/2 W^T W) and
    ``cdcore.quad_penalty(model)`` adds penalty_param * sum ||W^T W - I||_F^2 to the loss
    (Xiao, Liu, Toh, arXiv:2203.10319; Hu, Xiao, Liu, Toh, arXiv:2205.10500).

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional
        As for :class:`torch.nn.LSTM` (``proj_size`` is not supported).
    penalty_param : float
        Finite, >= 0 (0 warns); CDOpt's convention, beta / 2 of the papers.
    granularity : {"stacked", "per_gate"}
        ``"stacked"``: each (4H, H) weight on St(4H, H) (CDOpt's choice).
        ``"per_gate"``: each of the four H x H gate blocks (i, f, g, o) on O(H).
    device, dtype
        As for :class:`torch.nn.LSTM`.

    Raises
    ------
    ValueError
        Bad ``penalty_param`` or ``granularity``.

    Notes
    -----
    Inputs and outputs are those of :class:`torch.nn.LSTM`: input (L, N, H_in) or
    (N, L, H_in) with ``batch_first``, output (L, N, D H), h_n and c_n (D num_layers, N, H).

    Without autograd (``torch.no_grad()``, evaluation), A(W) is computed once and reused
    by later forwards until a raw weight changes (in place, by the optimiser or
    ``load_state_dict``, or by being replaced), so evaluating many batches pays the
    constraint once.
    """

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
        check_penalty_param(penalty_param)
        check_granularity(granularity)
        super().__init__(
            input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype,
        )
        self.penalty_param = float(penalty_param)
        self.granularity = granularity
        self.dissolved_names = [n for n in self._flat_weights_names if n.startswith("weight_hh_l")]
        for name in self.dissolved_names:
            dissolve(self, name, penalty_param=penalty_param, granularity=granularity)
        self._penalty = _ForwardPenalty()
        self._no_grad_weights = _NoGradWeights()
        self._init_flat_weights()

    # -- nn.LSTM's weight list: only leaves, so nothing is evaluated twice ------------
    def _leaf(self, name: str):
        if name in self._parameters:
            return self._parameters[name]
        parametrizations = self._modules.get("parametrizations")
        if parametrizations is not None and name in parametrizations:
            return parametrizations[name].original
        return None

    def _init_flat_weights(self) -> None:
        # nn.LSTM stores getattr(self, name) here, which would evaluate the
        # parametrisation (and its weight-change check would evaluate it again on
        # every forward).  Keep the raw leaves instead; forward swaps in A(W).
        self._flat_weights = [self._leaf(n) for n in self._flat_weights_names]
        self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]
        self.flatten_parameters()

    def _update_flat_weights(self) -> None:
        pass  # the effective weights are computed once, in forward

    # -- the constraint ---------------------------------------------------------------
    def _raws(self) -> list[Tensor]:
        """The raw recurrent weights (what the optimiser moves), in the order of ``dissolved_names``."""
        return [self.parametrizations[n].original for n in self.dissolved_names]

    def _raw_stack(self) -> Tensor:
        """All raw recurrent weights as the batch of manifold points, shape (m, n, p)."""
        return to_blocks(torch.stack(self._raws()), self.granularity).flatten(0, 1)

    def _versions(self):
        return tuple(w._version for w in self._raws())

    def effective_weights(self) -> tuple[list[Tensor], Tensor]:
        """A(W) of every recurrent weight and the total penalty, in one batched operation.

        Returns
        -------
        weights : list of Tensor, each (4H, H)
            In the order of ``self.dissolved_names``.
        penalty : Tensor, 0-dim
            penalty_param * sum over weights of ||W^T W - I||_F^2 (against the granularity).

        Without autograd the result is cached until a raw weight changes (see the class notes).
        """
        if torch.is_grad_enabled():
            return self._compute_effective()
        raws = self._raws()
        cached = self._no_grad_weights.get(raws)
        if cached is None:
            cached = self._compute_effective()
            self._no_grad_weights.put(raws, cached)
        return list(cached[0]), cached[1]

    def _compute_effective(self) -> tuple[list[Tensor], Tensor]:
        X = self._raw_stack()
        A, sq = dissolve_with_penalty(X)
        k = len(self.dissolved_names)
        A = from_blocks(A.reshape(k, -1, *A.shape[-2:]), self.granularity)
        return list(A.unbind(0)), self.penalty_param * sq.sum()

    def dissolved_penalty(self) -> Tensor:
        """penalty_param * sum ||W^T W - I||_F^2 over this module's recurrent weights.

        Reuses the value computed by the last forward when the raw weights have not
        changed since (sharing W^T W with A(W)); each cached value is handed out once.
        """
        key = (self._versions(), torch.is_grad_enabled())
        if self._penalty.key == key and self._penalty.value is not None:
            value = self._penalty.value
            self._penalty.key = self._penalty.value = None
            return value
        return self.effective_weights()[1]

    def forward(self, input, hx=None):
        weights, penalty = self.effective_weights()
        self._penalty.key = (self._versions(), torch.is_grad_enabled())
        self._penalty.value = penalty
        leaves = self._flat_weights
        effective = dict(zip(self.dissolved_names, weights))
        self._flat_weights = [effective.get(n, w) for n, w in zip(self._flat_weights_names, leaves)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = leaves

    # -- import / export ---------------------------------------------------------------
    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, penalty_param: float, granularity: str = "stacked") -> "StiefelLSTM":
        """A ``StiefelLSTM`` with the weights of ``lstm``, recurrent ones projected onto the manifold.

        The global random stream is left exactly as it was (construction draws its
        throw-away initial weights under :func:`torch.random.fork_rng`), so converting
        a model does not change what is drawn after it.

        Raises
        ------
        ValueError
            If ``lstm`` uses ``proj_size``, or bad ``penalty_param`` / ``granularity``.
        """
        if getattr(lstm, "proj_size", 0):
            raise ValueError(f"proj_size must be 0 for a StiefelLSTM; got {lstm.proj_size}")
        ref = next(lstm.parameters())
        with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
            out = cls(
                lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias,
                batch_first=lstm.batch_first, dropout=lstm.dropout, bidirectional=lstm.bidirectional,
                penalty_param=penalty_param, granularity=granularity, device=ref.device, dtype=ref.dtype,
            )
        with torch.no_grad():
            for name in out._flat_weights_names:
                src = getattr(lstm, name)
                if name in out.dissolved_names:
                    src = project(src, granularity)
                out._leaf(name).copy_(src)
        return out

    # -- export ------------------------------------------------------------------------
    def to_lstm(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` with the projected, exactly feasible recurrent weights.

        Every recurrent weight is the polar factor of the raw weight (nearest point of
        the manifold, per block for ``"per_gate"``); all other parameters are copied.
        Same device and dtype.
        """
        ref = next(self.parameters())
        lstm = nn.LSTM(
            self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
            device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            for name in self._flat_weights_names:
                src = self._leaf(name)
                if name in self.dissolved_names:
                    src = project(src, self.granularity)
                getattr(lstm, name).copy_(src)
        return lstm

    def extra_repr(self) -> str:
        return super().extra_repr() + f", penalty_param={self.penalty_param}, granularity={self.granularity!r}"
