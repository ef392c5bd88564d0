r"""The recurrent cells a run can use, and the initialisations of their recurrent weights.

A run's plain initial module is built here (:func:`make_plain`): ``nn.LSTM``, ``nn.GRU`` or
``nn.RNN`` (``--cell``), batch-first, with PyTorch's default initialisation; then
:func:`initialize` may replace its recurrent weights ``weight_hh_l{k}[_reverse]`` by one of
the orthogonal initialisations of the literature (``--init``).  Both happen before any
method attaches its constraint, so every method starts from the same weights.

Every recurrent weight has shape (g H, H): g = 4 gate blocks for an LSTM (i, f, g, o), 3 for
a GRU (r, z, n), 1 for a vanilla RNN.  An initialisation fills each H x H gate block
independently (for the RNN the block is the whole weight), drawing from one
``torch.Generator`` in the order of ``_flat_weights_names`` and, within a weight, of the
gate blocks.

The initialisations (``INITS``):

``default``
    PyTorch's own: every weight U(-1/sqrt(H), 1/sqrt(H)) (``nn.RNNBase.reset_parameters``);
    nothing is drawn here.
``orthogonal``
    Each gate block a random orthogonal matrix, ``torch.nn.init.orthogonal_`` (QR of a
    standard normal matrix with the signs of R's diagonal: Haar measure on O(H); Saxe,
    McClelland & Ganguli 2014, arXiv:1312.6120).  Per gate block, not stacked: a stacked
    (g H, H) weight then has W^T W = g I, so a method constrained at ``stacked`` granularity
    starts from W / sqrt(g), its polar factor (exactly what its projection gives).
``henaff``
    Henaff, Szlam & LeCun, "Recurrent orthogonal networks and long-memory tasks", ICML
    2016, as expRNN implements it (``henaff_init_``, Lezcano-Casado & Martinez-Rubio, ICML
    2019, github.com/Lezcano/expRNN, ``initialization.py``): a skew-symmetric A, block
    diagonal with floor(H/2) 2 x 2 blocks [[0, s_i], [-s_i, 0]], s_i ~ U[-pi, pi]
    independent (an odd H leaves the last row and column of A zero), mapped to the
    orthogonal B = expm(A).
``cayley``
    The Cayley-distributed initialisation of Helfrich, Willmott & Ye, "Orthogonal recurrent
    neural networks with scaled Cayley transform", ICML 2018 (scoRNN), as expRNN implements
    and uses it (``cayley_init_``): the same block structure with
    s_i = -sqrt((1 - cos t_i) / (1 + cos t_i)) = -tan(t_i / 2), t_i ~ U[0, pi/2], mapped, as
    in expRNN's ``exprnn`` and ``dtriv`` modes, by B = expm(A).  Note: scoRNN maps the same A
    by the Cayley transform (I + A)^{-1} (I - A), whose rotation angles are the t_i (uniform
    on [0, pi/2]); through expm, as here, the angles are |s_i| = tan(t_i / 2), in [0, 1].

For ``henaff`` and ``cayley``, expm of such an A is block diagonal with rotation blocks
[[cos s_i, sin s_i], [-sin s_i, cos s_i]]; it is computed in that closed form (exactly
orthogonal up to rounding of cos and sin).  expRNN's hidden update is h <- sigma(W_in x + h B)
(a row vector times B), PyTorch's is h <- sigma(W_ih x + W_hh h), so the recurrent weight is
W_hh = B^T.  Biases and input weights keep PyTorch's default initialisation (expRNN's
recurrent map has no bias; its input kernel uses Kaiming's normal initialisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "CELLS",
    "DEFAULT_CELL",
    "DEFAULT_INIT",
    "GATES",
    "INITS",
    "NONLINEARITIES",
    "cayley_angles",
    "henaff_angles",
    "initialize",
    "make_plain",
    "plain_class",
    "recurrent_names",
    "rotation_blocks",
]

#: cell name -> the plain PyTorch module
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
#: gate blocks per recurrent weight: (g H, H)
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
DEFAULT_CELL = "lstm"
#: the vanilla RNN's nonlinearities (``nn.RNN(nonlinearity=...)``)
NONLINEARITIES = ("tanh", "relu")
INITS = ("default", "orthogonal", "henaff", "cayley")
DEFAULT_INIT = "default"
#: ``nn.RNNBase.mode`` -> cell name (CDOpt's modules use the same modes)
_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}


def make_plain(
    cell: str, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, nonlinearity: str
) -> nn.RNNBase:
    """The plain batch-first module of ``cell`` with PyTorch's default initialisation.

    ``nonlinearity`` (``"tanh"`` or ``"relu"``) is used by the ``rnn`` cell only.  Draws from
    the global random stream exactly as the plain constructor does.

    Raises
    ------
    ValueError
        Unknown cell or nonlinearity.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; allowed: {', '.join(CELLS)}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; allowed: {', '.join(NONLINEARITIES)}")
    extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    return CELLS[cell](
        input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional, **extra
    )


def plain_class(module: nn.Module) -> tuple[type[nn.RNNBase], dict]:
    """The plain class of a recurrent module (nn's, cdcore's, CDOpt's, parametrised or not) and the
    extra constructor arguments it needs (``nonlinearity`` for an RNN), from its ``mode``."""
    cell = _MODES[module.mode]
    return CELLS[cell], ({"nonlinearity": module.nonlinearity} if cell == "rnn" else {})


def recurrent_names(module: nn.Module) -> list[str]:
    """Names of the recurrent weights ``weight_hh_l{k}[_reverse]`` of a recurrent module."""
    return [n for n in module._flat_weights_names if n.startswith("weight_hh_l")]


def henaff_angles(n: int, generator: torch.Generator) -> Tensor:
    """``n`` angles s_i ~ U[-pi, pi] (Henaff et al. 2016; expRNN's ``henaff_init_``), float64."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi


def cayley_angles(n: int, generator: torch.Generator) -> Tensor:
    """``n`` values s_i = -sqrt((1 - cos t_i) / (1 + cos t_i)), t_i ~ U[0, pi/2] (Helfrich et al.
    2018; expRNN's ``cayley_init_``), float64."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * (math.pi / 2)
    return -torch.sqrt((1 - torch.cos(t)) / (1 + torch.cos(t)))


def rotation_blocks(size: int, angles: Tensor) -> Tensor:
    """B^T with B = expm(A), A the size x size skew-symmetric block-diagonal matrix whose 2 x 2
    blocks are [[0, s_i], [-s_i, 0]] (expRNN's ``create_diag_``).

    Parameters
    ----------
    size : int
        H (odd: the last coordinate is left fixed, B[-1, -1] = 1).
    angles : Tensor, (size // 2,)
        The s_i.

    Returns
    -------
    Tensor, (size, size), dtype of ``angles``
        Block diagonal, blocks [[cos s_i, -sin s_i], [sin s_i, cos s_i]] (the transpose of
        expm's [[cos s_i, sin s_i], [-sin s_i, cos s_i]]).
    """
    if angles.shape != (size // 2,):
        raise ValueError(f"need {size // 2} angles for size {size}; got shape {tuple(angles.shape)}")
    W = torch.eye(size, dtype=angles.dtype)
    c, s = torch.cos(angles), torch.sin(angles)
    i = torch.arange(0, 2 * (size // 2), 2)
    W[i, i], W[i, i + 1], W[i + 1, i], W[i + 1, i + 1] = c, -s, s, c
    return W


def _block(init: str, size: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    if init == "orthogonal":
        block = torch.empty(size, size, dtype=torch.float64)
        return nn.init.orthogonal_(block, generator=generator).to(dtype)
    draw = henaff_angles if init == "henaff" else cayley_angles
    return rotation_blocks(size, draw(size // 2, generator)).to(dtype)


def initialize(module: nn.RNNBase, init: str, generator: torch.Generator) -> None:
    """Replace the recurrent weights of the plain ``module`` by ``init`` (see the module docstring).

    Every H x H gate block of every ``weight_hh_l{k}[_reverse]`` gets an independent draw from
    ``generator`` (computed in float64, then cast to the weight's dtype and device); ``default``
    changes nothing and draws nothing.  The global random stream is not used.

    Raises
    ------
    ValueError
        Unknown ``init``.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    if init == "default":
        return
    with torch.no_grad():
        for name in recurrent_names(module):
            w = getattr(module, name)
            H = w.shape[-1]
            blocks = [_block(init, H, generator, w.dtype) for _ in range(w.shape[0] // H)]
            w.copy_(torch.cat(blocks).to(w.device))
