"""The method registry: each way of keeping the recurrent weights orthogonal.

A method turns the plain initial ``nn.LSTM`` of a run into its own recurrent module
and says how to optimise it.  The harness only sees :class:`Built`:

* ``rnn``: the recurrent module, called as ``rnn(x)`` with batch-first input;
* ``optimizer(model)``: the optimiser for the whole model;
* ``penalty()``: the extra loss term, or None;
* ``weights()``: ``{name: (raw, effective)}`` of the constrained recurrent weights,
  raw being what the optimiser updates and effective what the forward uses;
* ``constraint_work()``: one step's worth of the constraint's own arithmetic
  (map + penalty with backward, retraction, trivialisation), timed on its own;
* ``context()``: a context manager entered around each forward.

Every method receives the same unconstrained initial weights for a given seed;
constrained methods project their recurrent weights onto the manifold when attaching.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import cdcore
from cdcore import stiefel
from cdcore.dissolving import project, to_blocks


@dataclass
class Built:
    rnn: nn.Module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    weights: Callable[[], dict[str, tuple[Tensor, Tensor]]]
    penalty: Callable[[], Tensor] | None = None
    constraint_work: Callable[[], None] | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Method:
    name: str
    math: str
    reference: str
    build: Callable[[nn.LSTM, object], Built]
    uses_penalty: bool = False
    granularities: tuple[str, ...] = ("stacked", "per_gate")
    requires: str | None = None  # an optional package the method needs
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def available(self) -> bool:
        if self.requires is None:
            return True
        import importlib.util

        return importlib.util.find_spec(self.requires) is not None


def hh_names(lstm: nn.LSTM) -> list[str]:
    return [n for n in lstm._flat_weights_names if n.startswith("weight_hh_l")]


#: upstream gradient used when timing the constraint's backward on its own: small, like a
#: training gradient (the cost of expm's backward grows with the norm of its input)
GRAD_SCALE = 1e-3


def _upstream(t: Tensor) -> Tensor:
    return torch.full_like(t, GRAD_SCALE)


def _split_params(model: nn.Module, constrained: list[Tensor]):
    ids = {id(p) for p in constrained}
    return [p for p in model.parameters() if id(p) not in ids]


def _adam(model, constrained, cfg):
    """Adam with the constrained weights in their own group (lr_constrained)."""
    groups = [{"params": _split_params(model, constrained)}]
    if constrained:
        groups.append({"params": constrained, "lr": cfg.lr_constrained or cfg.lr})
    return torch.optim.Adam(groups, lr=cfg.lr)


# ---------------------------------------------------------------------------------------


def build_lstm(lstm: nn.LSTM, cfg) -> Built:
    names = hh_names(lstm)
    return Built(
        rnn=lstm,
        optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=cfg.lr),
        weights=lambda: {n: (getattr(lstm, n), getattr(lstm, n)) for n in names},
    )


def build_cd(lstm: nn.LSTM, cfg) -> Built:
    rnn = cdcore.StiefelLSTM.from_lstm(lstm, penalty_param=cfg.penalty_param, granularity=cfg.granularity)
    raws = [getattr(rnn, n) for n in rnn.dissolved_names]  # the raw weights W (plain parameters)

    def weights():
        eff, _ = rnn.effective_weights()
        return {n: (r, e) for n, r, e in zip(rnn.dissolved_names, raws, eff)}

    def work():
        eff, pen = rnn.effective_weights()
        torch.autograd.grad([pen, *eff], raws, [torch.ones_like(pen), *map(_upstream, eff)])

    return Built(rnn=rnn, optimizer=lambda model: _adam(model, raws, cfg), weights=weights,
                 penalty=lambda: cdcore.quad_penalty(rnn), constraint_work=work)


def _geotorch(triv: str):
    def build(lstm: nn.LSTM, cfg) -> Built:
        import geotorch

        names = hh_names(lstm)
        init = {n: stiefel.projx(getattr(lstm, n).detach()) for n in names}
        with torch.random.fork_rng(devices=[init[names[0]].device] if init[names[0]].is_cuda else []):
            for n in names:
                geotorch.orthogonal(lstm, n, triv=triv)
                setattr(lstm, n, init[n])  # same start as every other method
        originals = [lstm.parametrizations[n].original for n in names]

        def weights():
            return {n: (getattr(lstm, n), getattr(lstm, n)) for n in names}

        def work():
            eff = [getattr(lstm, n) for n in names]
            torch.autograd.grad(eff, originals, list(map(_upstream, eff)))

        return Built(rnn=lstm, optimizer=lambda model: _adam(model, originals, cfg), weights=weights,
                     constraint_work=work, context=parametrize.cached)

    return build


def build_cayley(lstm: nn.LSTM, cfg) -> Built:
    names = hh_names(lstm)
    with torch.no_grad():
        for n in names:
            w = getattr(lstm, n)
            w.copy_(project(w, cfg.granularity))
    hh = [getattr(lstm, n) for n in names]

    def optimizer(model):
        return cdcore.optim.CayleyAdam(
            [{"params": _split_params(model, hh)},
             {"params": hh, "stiefel": True, "granularity": cfg.granularity, "lr": cfg.lr_constrained or cfg.lr}],
            lr=cfg.lr,
        )

    def work():
        X = to_blocks(torch.stack(hh), cfg.granularity).flatten(0, 1).detach()
        G = _upstream(X) if hh[0].grad is None else to_blocks(
            torch.stack([p.grad for p in hh]), cfg.granularity).flatten(0, 1)
        stiefel.retr_cayley(X, stiefel.proju(X, -1e-3 * G))

    return Built(rnn=lstm, optimizer=optimizer, weights=lambda: {n: (getattr(lstm, n),) * 2 for n in names},
                 constraint_work=work)


def build_cdopt(lstm: nn.LSTM, cfg) -> Built:
    import cdopt.nn as cdnn
    from cdopt.manifold_torch import stiefel_torch

    ref = next(lstm.parameters())
    with torch.random.fork_rng(devices=[ref.device] if ref.is_cuda else []):
        rnn = cdnn.LSTM_cdopt(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=lstm.batch_first,
            bidirectional=lstm.bidirectional, manifold_class=stiefel_torch, penalty_param=cfg.penalty_param,
            device=ref.device, dtype=ref.dtype,
        )
    names = hh_names(lstm)
    with torch.no_grad():
        for n in rnn._flat_weights_names:
            src = getattr(lstm, n)
            getattr(rnn, n).copy_(stiefel.projx(src) if n in names else src)
    raws = [getattr(rnn, n) for n in names]

    def weights():
        return {n: (r, rnn.manifold.A(r)) for n, r in zip(names, raws)}

    def work():
        X = torch.stack(raws)
        A = rnn.manifold.A(X)
        pen = cfg.penalty_param * rnn.manifold.C_quad_penalty(X)
        torch.autograd.grad([pen, A], raws, [torch.ones_like(pen), _upstream(A)])

    return Built(rnn=rnn, optimizer=lambda model: _adam(model, raws, cfg), weights=weights,
                 penalty=lambda: cdnn.get_quad_penalty(rnn), constraint_work=work)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lstm", "W unconstrained; plain Adam", "Hochreiter & Schmidhuber 1997 (torch.nn.LSTM)", build_lstm),
        Method("cd", "forward uses A(W) = W(3/2 I - 1/2 W^T W); loss + penalty_param ||W^T W - I||_F^2; Adam",
               "Xiao, Liu, Toh arXiv:2203.10319; Hu, Xiao, Liu, Toh arXiv:2205.10500 (cdcore.StiefelLSTM)",
               build_cd, uses_penalty=True),
        Method("geotorch_expm", "W = B expm(S) (padded 4H x 4H skew S): trivialisation; Adam on S",
               "Lezcano-Casado & Martinez-Rubio, ICML 2019; Lezcano-Casado, NeurIPS 2019 (geotorch.orthogonal)",
               _geotorch("expm"), granularities=("stacked",)),
        Method("geotorch_cayley", "W = B cayley(S) (padded 4H x 4H skew S): trivialisation; Adam on S",
               "Lezcano-Casado, NeurIPS 2019 (geotorch.orthogonal, triv='cayley')",
               _geotorch("cayley"), granularities=("stacked",)),
        Method("cayley", "W <- R_W(-lr m/sqrt(v)): Riemannian Adam, tangent momentum, Cayley retraction",
               "Li, Fuxin, Todorovic, ICLR 2020; Wen & Yin 2013 (cdcore.optim.CayleyAdam)", build_cayley),
        Method("cdopt", "as cd, through the reference package (LSTM_cdopt, stiefel_torch)",
               "CDOpt 0.5.5 (Xiao, Hu, Liu, Toh)", build_cdopt, uses_penalty=True,
               granularities=("stacked",), requires="cdopt"),
    ]
}

__all__ = ["METHODS", "Built", "Method", "hh_names"]
