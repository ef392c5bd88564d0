"""The method registry: each way of keeping the recurrent weights orthogonal.

A method turns the plain initial recurrent module of a run (``nn.LSTM``, ``nn.GRU``,
``nn.RNN`` or the modReLU cell ``bench.cells.ModReLURNN``: the run's ``cell``, see
:mod:`bench.cells`) into its own recurrent module and
says how to optimise it.  The trainer (:mod:`bench.runner`) only sees
:class:`Method` (what the method is) and :class:`Built` (one model of it) and never
asks which method it runs:

* ``Method.constrained``: whether the recurrent weights are meant to stay on the
  manifold (an exploded feasibility then counts as divergence);
* ``Built.optimizer(model)``, ``Built.penalty()``, ``Built.context()``: how to train;
* ``Built.weights()``: the constrained recurrent weights, raw and effective;
* ``Built.project()``: the exactly feasible plain module (deployment);
* ``Built.counters(optimizer)``: the optimiser's own counts (e.g. re-projections);
* ``Built.constraint_work()``: the constraint's arithmetic of one step, timed alone.

Every method receives the same unconstrained initial weights for a given seed (and
``--init``); constrained methods project their recurrent weights onto the manifold when
attaching.  Every method optimises the whole model with ``cfg.optimizer`` (Adam or RMSprop,
:func:`make_optimizer`), the constrained weights in their own group at ``lr_constrained``.
``python -m bench.ablate --list-methods`` prints the registry.

On the modReLU cell (:class:`bench.cells.ModReLURNN`, not a PyTorch recurrent module) the
methods attach as they would to any layer: ``cd`` with ``cdcore.dissolve`` on ``weight_hh_l0``
(cdcore's ``StiefelRNN`` wraps the fused ``nn.RNN`` only), ``cdopt`` with CDOpt's own
``set_constraint_dissolving`` (CDOpt has no modReLU module), ``geotorch_*`` and ``cayley`` as
on every cell.

Names: the unconstrained baseline is ``unconstrained``; in 0.1.0 it was called ``lstm``,
which stays an alias: ``METHODS["lstm"]``, ``"lstm" in METHODS``, :func:`canonical` and every
command line accept it (iterating ``METHODS`` yields canonical names only).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import cdcore
from cdcore import stiefel
from cdcore.dissolving import project, to_blocks

from .cells import plain_class, recurrent_names

__all__ = [
    "ALIASES",
    "METHODS",
    "OPTIMIZERS",
    "Built",
    "Method",
    "canonical",
    "hh_names",
    "make_optimizer",
    "plain_projected",
]


def _no_counters(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    return {}


@dataclass
class Built:
    """One model of a method, as the trainer uses it.

    Attributes
    ----------
    rnn : nn.Module
        The recurrent module, called as ``rnn(x)`` with batch-first input (N, T, F);
        returns ``(output, state)`` like the plain module of its cell.
    optimizer : callable
        ``optimizer(model) -> torch.optim.Optimizer`` for the whole model (rnn and head).
    weights : callable
        ``weights() -> {name: (raw, effective)}`` of the recurrent weights, raw being
        what the optimiser moves and effective what the forward uses (the same tensor
        for methods without a map), each (g H, H) (g = 4 LSTM, 3 GRU, 1 RNN).
    project : callable
        ``project() -> nn.Module``: a new plain recurrent module of the cell (``nn.LSTM``,
        ``nn.GRU``, ``nn.RNN`` with the same nonlinearity, or ``ModReLURNN``) holding the
        trained weights, its recurrent weights replaced by their exact projection onto
        the manifold (polar factor, per gate block for ``per_gate``); the model is not
        changed.  For an unconstrained method this changes what the model computes (the
        ``test_metric_projected`` column shows by how much).
    penalty : callable or None
        ``penalty() -> Tensor``: a 0-dim term added to the loss, or None.
    constraint_work : callable or None
        One step's worth of the constraint's own arithmetic (map and penalty with their
        backward, the retraction, or the trivialisation), timed alone for
        ``constraint_share``; None when the method has none.
    context : callable
        A context manager entered around each forward (e.g. geotorch's
        ``parametrize.cached``).
    counters : callable
        ``counters(optimizer) -> {column: int}``: the optimiser's own counts reported in
        ``runs.csv`` (every key must be one of ``bench.runner.RUN_COLUMNS``).
    penalty_in_forward : bool
        True when ``rnn.forward_with_penalty(x) -> (output, state, penalty)`` returns, with the
        forward, what ``penalty()`` would (from the forward's own arithmetic); the train step
        then takes the penalty from there instead of calling ``penalty()``.
    weight_path : callable
        ``weight_path() -> str``: how the recurrent module hands its kernel the weights
        (``runs.csv``'s ``weight_path``: cdcore's ``"flat"`` or ``"fallback: <reason>"``);
        ``""`` when the method does not say.
    """

    rnn: nn.Module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    weights: Callable[[], dict[str, tuple[Tensor, Tensor]]]
    project: Callable[[], nn.Module]
    penalty: Callable[[], Tensor] | None = None
    constraint_work: Callable[[], None] | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    counters: Callable[[torch.optim.Optimizer], dict[str, int]] = _no_counters
    penalty_in_forward: bool = False
    weight_path: Callable[[], str] = str


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes
    ----------
    name : str
        The key used on the command line and in ``runs.csv``.
    math : str
        What the recurrent weight is and how it moves (``--list-methods``).
    reference : str
        Paper(s) and implementation (``--list-methods``).
    build : callable
        ``build(rnn, cfg) -> Built`` from the plain initial module of the run's cell
        (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` or ``ModReLURNN``) and the
        :class:`bench.runner.RunConfig`.
    constrained : bool
        True when the recurrent weights are kept on (or pulled to) the manifold.
    uses_penalty : bool
        True when ``penalty_param`` applies (the sweep multiplies only these by ``--penalty``).
    granularities : tuple of str
        The granularities the method supports (for a gated cell; a vanilla RNN has no gates and
        runs ``stacked`` only).
    requires : str or None
        An optional package the method needs; without it the sweep skips the method.
    tolerance : float or None
        Feasibility ``||A^T A - I||_F`` of the weights the forward uses (max over
        recurrent weights, float32) that the method keeps after training; the learning
        contract (``tests/test_contract.py``) holds it to this.  None: unconstrained.
    """

    name: str
    math: str
    reference: str
    build: Callable[[nn.RNNBase, object], Built]
    constrained: bool = True
    uses_penalty: bool = False
    granularities: tuple[str, ...] = ("stacked", "per_gate")
    requires: str | None = None
    tolerance: float | None = None

    def available(self) -> bool:
        """True when the package the method requires (if any) is installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


class _Registry(dict):
    """``{name: Method}`` that also answers to the old names in :data:`ALIASES` (lookups and
    ``in``); iteration, ``keys()`` and ``items()`` give the canonical names only."""

    def __getitem__(self, name):
        return super().__getitem__(ALIASES.get(name, name))

    def __contains__(self, name):
        return super().__contains__(ALIASES.get(name, name))

    def get(self, name, default=None):
        return super().get(ALIASES.get(name, name), default)


#: old method name -> its canonical name (``lstm`` meant "no constraint" before the GRU and RNN cells)
ALIASES = {"lstm": "unconstrained"}
#: canonical name -> the name the run_ids of 0.1.0 hashed (so results folders keep their run_ids)
LEGACY_NAMES = {v: k for k, v in ALIASES.items()}


def canonical(name: str) -> str:
    """The canonical method name of ``name`` (an alias of :data:`ALIASES`, or ``name`` itself)."""
    return ALIASES.get(name, name)


def hh_names(rnn: nn.RNNBase) -> list[str]:
    """Names of the recurrent weights ``weight_hh_l{k}[_reverse]`` of ``rnn``."""
    return recurrent_names(rnn)


def plain_projected(rnn: nn.Module, recurrent: dict[str, Tensor], granularity: str) -> nn.RNNBase:
    """A new plain module of ``rnn``'s cell (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` with the same
    nonlinearity) shaped like ``rnn``: the weights in ``recurrent`` projected exactly onto the
    manifold (polar factor, :func:`cdcore.dissolving.project`), every other weight copied from
    ``getattr(rnn, name)``.  Same device and dtype."""
    ref = next(rnn.parameters())
    cls, extra = plain_class(rnn)
    plain = cls(
        rnn.input_size,
        rnn.hidden_size,
        rnn.num_layers,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        bidirectional=rnn.bidirectional,
        device=ref.device,
        dtype=ref.dtype,
        **extra,
    )
    with torch.no_grad():
        for n in plain._flat_weights_names:
            src = project(recurrent[n].detach(), granularity) if n in recurrent else getattr(rnn, n)
            getattr(plain, n).copy_(src)
    return plain


#: upstream gradient used when timing the constraint's backward on its own: small, like a
#: training gradient (the cost of expm's backward grows with the norm of its input)
GRAD_SCALE = 1e-3


def _upstream(t: Tensor) -> Tensor:
    return torch.full_like(t, GRAD_SCALE)


def _split_params(model: nn.Module, constrained: list[Tensor]):
    ids = {id(p) for p in constrained}
    return [p for p in model.parameters() if id(p) not in ids]


#: ``--optimizer`` -> (the torch optimiser, the Riemannian one of the ``cayley`` method)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, cdcore.optim.CayleyAdam),
    "rmsprop": (torch.optim.RMSprop, cdcore.optim.CayleyRMSprop),
}


def make_optimizer(model: nn.Module, constrained: list[Tensor], cfg, stiefel_group: dict | None = None):
    """The optimiser of a whole model: ``cfg.optimizer`` (Adam or RMSprop, PyTorch's defaults
    besides the learning rate) at ``cfg.lr``, the ``constrained`` weights in a second group at
    ``cfg.lr_constrained`` (``cfg.lr`` when None).

    ``stiefel_group``: for a Riemannian method, the options that mark the constrained group as
    Stiefel parameters (e.g. ``{"stiefel": True, "granularity": ...}``); the optimiser is then
    the matching Cayley optimiser of :mod:`cdcore.optim` (``CayleyAdam``, ``CayleyRMSprop``),
    whose Euclidean groups get exactly the torch update.  Without constrained weights the model
    is one group (what ``torch.optim.Adam(model.parameters(), lr)`` builds).

    Raises
    ------
    ValueError
        ``cfg.optimizer`` not in :data:`OPTIMIZERS`.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    euclidean, riemannian = OPTIMIZERS[cfg.optimizer]
    groups = [{"params": _split_params(model, constrained)}]
    if constrained:
        groups.append({"params": constrained, "lr": cfg.lr_constrained or cfg.lr, **(stiefel_group or {})})
    return (riemannian if stiefel_group else euclidean)(groups, lr=cfg.lr)


# ---------------------------------------------------------------------------------------


def build_unconstrained(rnn: nn.RNNBase, cfg) -> Built:
    names = hh_names(rnn)

    def weights():
        return {n: (getattr(rnn, n), getattr(rnn, n)) for n in names}

    return Built(
        rnn=rnn,
        optimizer=lambda model: make_optimizer(model, [], cfg),
        weights=weights,
        project=lambda: plain_projected(rnn, {n: e for n, (_, e) in weights().items()}, cfg.granularity),
    )


# The lines of build_cd that know cdcore's Stiefel modules' API (which class per cell, where the
# raw recurrent weights live, how A(W) and the penalty are computed together): the only ones
# to adapt when it changes.
_CD_CLASSES = {nn.LSTM: cdcore.StiefelLSTM, nn.GRU: cdcore.StiefelGRU, nn.RNN: cdcore.StiefelRNN}


def _cd_raws(rnn) -> list[Tensor]:
    return [getattr(rnn, n) for n in rnn.dissolved_names]  # the raw weights W (plain parameters)


def _cd_effective(rnn) -> tuple[list[Tensor], Tensor]:
    return rnn.effective_weights()


def build_cd(plain: nn.RNNBase, cfg) -> Built:
    if plain_class(plain)[0] not in _CD_CLASSES:
        return _build_cd_dissolved(plain, cfg)
    cls = _CD_CLASSES[plain_class(plain)[0]]
    rnn = cls.from_plain(plain, penalty_param=cfg.penalty_param, granularity=cfg.granularity)
    raws = _cd_raws(rnn)

    def weights():
        eff, _ = _cd_effective(rnn)
        return {n: (r, e) for n, r, e in zip(rnn.dissolved_names, raws, eff)}

    def work():
        eff, pen = _cd_effective(rnn)
        torch.autograd.grad([pen, *eff], raws, [torch.ones_like(pen), *map(_upstream, eff)])

    return Built(
        rnn=rnn,
        optimizer=lambda model: make_optimizer(model, raws, cfg),
        weights=weights,
        project=rnn.to_plain,
        penalty=lambda: cdcore.quad_penalty(rnn),
        constraint_work=work,
        penalty_in_forward=True,  # rnn.forward_with_penalty: the penalty from the forward's Gram matrices
        weight_path=lambda: rnn.weight_path,
    )


def _build_cd_dissolved(plain: nn.Module, cfg) -> Built:
    """cd on a cell that is not a PyTorch recurrent module (:class:`bench.cells.ModReLURNN`):
    ``cdcore.dissolve`` on each recurrent weight (projected onto the manifold when attaching),
    ``cdcore.quad_penalty``; the forward reads each weight once, so A(W) is computed once per
    forward.  ``project()``: the polar factor of the raw weight, as ``StiefelRNN.to_plain``."""
    names = hh_names(plain)
    for n in names:
        cdcore.dissolve(plain, n, penalty_param=cfg.penalty_param, granularity=cfg.granularity)
    raws = [plain.parametrizations[n].original for n in names]

    def weights():
        return {n: (r, getattr(plain, n)) for n, r in zip(names, raws)}

    def work():
        eff = [getattr(plain, n) for n in names]
        pen = cdcore.quad_penalty(plain)
        torch.autograd.grad([pen, *eff], raws, [torch.ones_like(pen), *map(_upstream, eff)])

    return Built(
        rnn=plain,
        optimizer=lambda model: make_optimizer(model, raws, cfg),
        weights=weights,
        project=lambda: plain_projected(plain, dict(zip(names, raws)), cfg.granularity),
        penalty=lambda: cdcore.quad_penalty(plain),
        constraint_work=work,
    )


class _Contiguous(nn.Module):
    """A parametrisation that returns its input as one contiguous tensor (equal values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _geotorch(triv: str):
    def build(plain: nn.RNNBase, cfg) -> Built:
        import geotorch

        names = hh_names(plain)
        init = {n: stiefel.projx(getattr(plain, n).detach()) for n in names}
        with torch.random.fork_rng(devices=[init[names[0]].device] if init[names[0]].is_cuda else []):
            for n in names:
                geotorch.orthogonal(plain, n, triv=triv)
                # geotorch returns the first H columns of a gH x gH square: a strided view that
                # cuDNN cannot flatten (RuntimeError in nn's flatten_parameters on CUDA)
                parametrize.register_parametrization(plain, n, _Contiguous())
                setattr(plain, n, init[n])  # same start as every other method
        originals = [plain.parametrizations[n].original for n in names]

        def weights():
            return {n: (getattr(plain, n), getattr(plain, n)) for n in names}

        def work():
            eff = [getattr(plain, n) for n in names]
            torch.autograd.grad(eff, originals, list(map(_upstream, eff)))

        return Built(
            rnn=plain,
            optimizer=lambda model: make_optimizer(model, originals, cfg),
            weights=weights,
            project=lambda: plain_projected(plain, {n: getattr(plain, n) for n in names}, cfg.granularity),
            constraint_work=work,
            context=parametrize.cached,
        )

    return build


def build_cayley(plain: nn.RNNBase, cfg) -> Built:
    names = hh_names(plain)
    with torch.no_grad():
        for n in names:
            w = getattr(plain, n)
            w.copy_(project(w, cfg.granularity))
    hh = [getattr(plain, n) for n in names]

    def optimizer(model):
        return make_optimizer(model, hh, cfg, stiefel_group={"stiefel": True, "granularity": cfg.granularity})

    def work():
        X = to_blocks(torch.stack(hh), cfg.granularity).flatten(0, 1).detach()
        G = (
            _upstream(X)
            if hh[0].grad is None
            else to_blocks(torch.stack([p.grad for p in hh]), cfg.granularity).flatten(0, 1)
        )
        stiefel.retr_cayley(X, stiefel.proju(X, -1e-3 * G))

    return Built(
        rnn=plain,
        optimizer=optimizer,
        weights=lambda: {n: (getattr(plain, n),) * 2 for n in names},
        project=lambda: plain_projected(plain, dict(zip(names, hh)), cfg.granularity),
        constraint_work=work,
        counters=lambda opt: {"reprojections": opt.reprojections()},
    )


def build_cdopt(plain: nn.RNNBase, cfg) -> Built:
    import cdopt.nn as cdnn
    from cdopt.manifold_torch import stiefel_torch

    kind, extra = plain_class(plain)  # RNN_cdopt takes nonlinearity (tanh or relu) as nn.RNN does
    if kind not in (nn.LSTM, nn.GRU, nn.RNN):
        return _build_cdopt_dissolved(plain, cfg)
    cls = {nn.LSTM: cdnn.LSTM_cdopt, nn.GRU: cdnn.GRU_cdopt, nn.RNN: cdnn.RNN_cdopt}[kind]
    ref = next(plain.parameters())
    with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
        rnn = cls(
            plain.input_size,
            plain.hidden_size,
            plain.num_layers,
            batch_first=plain.batch_first,
            bidirectional=plain.bidirectional,
            manifold_class=stiefel_torch,
            penalty_param=cfg.penalty_param,
            device=ref.device,
            dtype=ref.dtype,
            **extra,
        )
    names = hh_names(plain)
    with torch.no_grad():
        for n in rnn._flat_weights_names:
            src = getattr(plain, n)
            getattr(rnn, n).copy_(stiefel.projx(src) if n in names else src)
    raws = [getattr(rnn, n) for n in names]

    def weights():
        return {n: (r, rnn.manifold.A(r)) for n, r in zip(names, raws)}

    def work():
        X = torch.stack(raws)
        A = rnn.manifold.A(X)
        pen = cfg.penalty_param * rnn.manifold.C_quad_penalty(X)
        torch.autograd.grad([pen, A], raws, [torch.ones_like(pen), _upstream(A)])

    return Built(
        rnn=rnn,
        optimizer=lambda model: make_optimizer(model, raws, cfg),
        weights=weights,
        project=lambda: plain_projected(rnn, {n: e for n, (_, e) in weights().items()}, cfg.granularity),
        penalty=lambda: cdnn.get_quad_penalty(rnn),
        constraint_work=work,
    )


def _build_cdopt_dissolved(plain: nn.Module, cfg) -> Built:
    """cdopt on a cell CDOpt has no module for (:class:`bench.cells.ModReLURNN`): CDOpt's own
    ``set_constraint_dissolving`` (``cdopt.nn.utils.set_constraints``: its parametrisation of
    any layer's weight, A(W) in the forward) with ``stiefel_torch`` on each recurrent weight,
    the raw weight then set to the same projected start as every other method, and CDOpt's
    ``get_quad_penalty``."""
    import cdopt.nn as cdnn
    from cdopt.manifold_torch import stiefel_torch
    from cdopt.nn.utils.set_constraints import set_constraint_dissolving

    names = hh_names(plain)
    ref = getattr(plain, names[0])
    start = {n: stiefel.projx(getattr(plain, n).detach()) for n in names}
    with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
        for n in names:
            set_constraint_dissolving(
                plain,
                n,
                manifold_class=stiefel_torch,
                manifold_args={"device": ref.device, "dtype": ref.dtype},
                penalty_param=cfg.penalty_param,
            )
    lists = [plain.parametrizations[n] for n in names]
    raws = [p.original for p in lists]
    with torch.no_grad():
        for n, r in zip(names, raws):
            r.copy_(start[n])

    def weights():
        return {n: (r, p.A(r)) for n, r, p in zip(names, raws, lists)}

    def work():
        eff = [p.A(r) for r, p in zip(raws, lists)]
        pen = cdnn.get_quad_penalty(plain)
        torch.autograd.grad([pen, *eff], raws, [torch.ones_like(pen), *map(_upstream, eff)])

    return Built(
        rnn=plain,
        optimizer=lambda model: make_optimizer(model, raws, cfg),
        weights=weights,
        project=lambda: plain_projected(plain, {n: e for n, (_, e) in weights().items()}, cfg.granularity),
        penalty=lambda: cdnn.get_quad_penalty(plain),
        constraint_work=work,
    )


#: feasibility bound of the exactly constrained methods: float32 rounding over training
EXACT = 1e-4
#: feasibility bound of the constraint-dissolving methods: A(W) is feasible to second order
#: in ||W^T W - I|| only, and the penalty keeps W near (not on) the manifold
DISSOLVED = 5e-2

METHODS: dict[str, Method] = _Registry(
    (m.name, m)
    for m in [
        Method(
            "unconstrained",
            "W unconstrained (the plain cell); Adam or RMSprop (alias: lstm, its name in 0.1.0)",
            "torch.nn.LSTM (Hochreiter & Schmidhuber 1997), nn.GRU (Cho et al. 2014), nn.RNN (Elman 1990)",
            build_unconstrained,
            constrained=False,
        ),
        Method(
            "cd",
            "forward uses A(W) = W(3/2 I - 1/2 W^T W); loss + penalty_param ||W^T W - I||_F^2; "
            "Adam/RMSprop on W",
            "Xiao, Liu, Toh arXiv:2203.10319; Hu, Xiao, Liu, Toh arXiv:2205.10500 "
            "(cdcore.StiefelLSTM / StiefelGRU / StiefelRNN)",
            build_cd,
            uses_penalty=True,
            tolerance=DISSOLVED,
        ),
        Method(
            "geotorch_expm",
            "W = B expm(S) (skew S on the padded gH x gH square): trivialisation; Adam/RMSprop on S",
            "Lezcano-Casado & Martinez-Rubio, ICML 2019; Lezcano-Casado, NeurIPS 2019 (geotorch.orthogonal)",
            _geotorch("expm"),
            granularities=("stacked",),
            tolerance=EXACT,
        ),
        Method(
            "geotorch_cayley",
            "W = B cayley(S) (skew S on the padded gH x gH square): trivialisation; Adam/RMSprop on S",
            "Lezcano-Casado, NeurIPS 2019 (geotorch.orthogonal, triv='cayley')",
            _geotorch("cayley"),
            granularities=("stacked",),
            tolerance=EXACT,
        ),
        Method(
            "cayley",
            "W <- R_W(-lr m/sqrt(v)): Riemannian Adam (tangent momentum) or RMSprop, Cayley retraction",
            "Li, Fuxin, Todorovic, ICLR 2020; Wen & Yin 2013 (cdcore.optim.CayleyAdam, CayleyRMSprop)",
            build_cayley,
            tolerance=EXACT,
        ),
        Method(
            "cdopt",
            "as cd, through the reference package (LSTM_cdopt / GRU_cdopt / RNN_cdopt, stiefel_torch; "
            "on the modReLU cell its set_constraint_dissolving)",
            "CDOpt 0.5.5 (Xiao, Hu, Liu, Toh)",
            build_cdopt,
            uses_penalty=True,
            granularities=("stacked",),
            requires="cdopt",
            tolerance=DISSOLVED,
        ),
    ]
)
