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

The modReLU cell (``--cell rnn --nonlinearity modrelu``) is the one cell that is not a PyTorch
module: :class:`ModReLURNN`, the recurrent cell of uRNN and expRNN, with a Python loop over
time.  It exists for the long-memory study (copying), where the orthogonal methods separate
from the unconstrained ones only with this cell (README, "Long-memory tasks").  "Fused kernels
only" is a promise of cdcore's ``StiefelLSTM`` / ``StiefelGRU`` / ``StiefelRNN``, not of every
cell the harness can train: this cell costs about what the fused LSTM costs per step (see its
docstring), and every method runs on it through the same paths as on the other cells (the
recurrent weight ``weight_hh_l0`` is a plain parameter of the module, so geotorch, cdcore's
``dissolve``, CDOpt's ``set_constraint_dissolving`` and the Cayley optimiser attach to it).
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
    "MODRELU",
    "NONLINEARITIES",
    "ModReLURNN",
    "cayley_angles",
    "henaff_angles",
    "initialize",
    "make_plain",
    "modrelu",
    "plain_class",
    "recurrent_names",
    "rotation_blocks",
]

#: cell name -> the plain PyTorch module
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
#: gate blocks per recurrent weight: (g H, H)
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
DEFAULT_CELL = "lstm"
#: the vanilla RNN's nonlinearities: ``nn.RNN(nonlinearity=...)``'s, and modReLU (:class:`ModReLURNN`)
NONLINEARITIES = ("tanh", "relu", "modrelu")
MODRELU = "modrelu"
INITS = ("default", "orthogonal", "henaff", "cayley")
DEFAULT_INIT = "default"
#: ``nn.RNNBase.mode`` -> cell name (CDOpt's modules use the same modes)
_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}


def modrelu(z: Tensor, bias: Tensor) -> Tensor:
    r"""modReLU of real pre-activations: sign(z) max(|z| + b, 0).

    Arjovsky, Shah & Bengio, "Unitary evolution recurrent neural networks", ICML 2016, eq. (8):
    sigma(z) = (|z| + b) z / |z| if |z| + b >= 0, else 0; for real z, z / |z| = sign(z) (and
    sigma(0) = 0).  Written as expRNN writes it (Lezcano-Casado & Martinez-Rubio, ICML 2019,
    github.com/Lezcano/expRNN, ``orthogonal.py``, class ``modrelu``).  With b >= 0 small it is
    close to the identity; a negative b_i zeroes the coordinates with |z_i| < -b_i.

    Parameters
    ----------
    z : Tensor, (..., H)
    bias : Tensor, (H,)
        b, broadcast over the leading dimensions.

    Returns
    -------
    Tensor, shape of ``z``, dtype of ``z`` and ``bias`` promoted
    """
    return torch.sign(z) * torch.relu(torch.abs(z) + bias)


class ModReLURNN(nn.Module):
    r"""The modReLU recurrent cell of uRNN / expRNN: one layer, batch-first, a Python loop over time.

    .. math:: h_t = \operatorname{modReLU}(W_{ih} x_t + W_{hh} h_{t-1};\ b), \qquad h_0 = 0

    with modReLU(z; b) = sign(z) max(|z| + b, 0) (:func:`modrelu`; Arjovsky, Shah & Bengio,
    ICML 2016, eq. (8)).  This is expRNN's ``OrthogonalRNN`` cell (Lezcano-Casado &
    Martinez-Rubio, "Cheap orthogonal constraints in neural networks", ICML 2019,
    github.com/Lezcano/expRNN, ``orthogonal.py``; geotorch's ``examples/copying_problem.py``
    uses it with an input bias): no input bias, no recurrent bias, the only bias is modReLU's.  expRNN
    writes the recurrence h B with a row vector h; here it is W_hh h as in ``nn.RNN``, so
    W_hh = B^T.

    Initialisation (drawn from the global random stream, in this order): ``weight_ih_l0``
    Kaiming normal for relu, N(0, 2 / input_size) (``nn.init.kaiming_normal_(w,
    nonlinearity="relu")``, as expRNN); ``weight_hh_l0`` U(-1/sqrt(H), 1/sqrt(H)) as
    ``nn.RNN``'s (expRNN starts from an orthogonal matrix: :func:`initialize` with
    ``henaff`` or ``cayley`` replaces it); ``bias_modrelu_l0`` U(-0.01, 0.01) (expRNN).

    It behaves like a 1-layer unidirectional batch-first ``nn.RNN`` where the harness needs
    it: ``forward(input, hx=None) -> (output, h_n)``, the parameters ``weight_ih_l0`` (H, F),
    ``weight_hh_l0`` (H, H) and ``bias_modrelu_l0`` (H,) listed in ``_flat_weights_names``
    (so the harness, :func:`initialize` and every method find the recurrent weight by the
    same name as on ``nn.RNN``), ``mode`` ``"RNN_MODRELU"`` and ``nonlinearity``
    ``"modrelu"``.

    Cost.  The forward computes W_ih x_t for all t in one matrix product, then T steps of one
    ``addmm`` and the four elementwise operations of modReLU; it reads ``weight_hh_l0`` (and
    every other parameter) once per call, before the loop, so a parametrised recurrent weight
    (geotorch, ``cdcore.dissolve``) is evaluated once per forward, not once per step.  Measured
    per optimiser step (forward, backward, RMSprop) at the long-memory study's shape (copying
    T = 100, i.e. 120 steps, hidden 128, batch 64, one thread, interleaved in one process):
    0.67x the fused ``nn.LSTM``'s step and 1.85x the fused tanh ``nn.RNN``'s (README,
    "Long-memory tasks"; docs/tasks.md has the command).  ``torch.compile`` of the unrolled loop
    would save about 45 % of the step but compiles for about a minute per sequence length on a
    CPU, so it is not used.

    Parameters
    ----------
    input_size, hidden_size : int
        F and H (positive).
    num_layers : int
        Must be 1.
    bias : bool
        With False, b = 0: modReLU is then the identity and the cell is linear.
    batch_first : bool
        Must be True (the harness's layout).
    bidirectional : bool
        Must be False.
    device, dtype
        Of the parameters.

    Raises
    ------
    ValueError
        ``num_layers`` other than 1, ``bidirectional``, ``batch_first=False``, or a size < 1.
    """

    mode = "RNN_MODRELU"
    nonlinearity = MODRELU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_layers != 1:
            raise ValueError(f"ModReLURNN has one layer; got num_layers={num_layers}; allowed: 1")
        if bidirectional:
            raise ValueError("ModReLURNN is unidirectional; got bidirectional=True; allowed: False")
        if not batch_first:
            raise ValueError("ModReLURNN is batch-first; got batch_first=False; allowed: True")
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"sizes must be positive; got input_size={input_size}, hidden_size={hidden_size}"
            )
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.bias, self.batch_first, self.bidirectional = 1, bias, True, False
        kw = {"device": device, "dtype": dtype}
        self.weight_ih_l0 = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
        self.weight_hh_l0 = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        if bias:
            self.bias_modrelu_l0 = nn.Parameter(torch.empty(hidden_size, **kw))
        else:
            self.register_parameter("bias_modrelu_l0", None)
        self._flat_weights_names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_modrelu_l0"] if bias else [])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the initial parameters (see the class docstring) from the global random stream."""
        bound = 1 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            nn.init.kaiming_normal_(self.weight_ih_l0, nonlinearity="relu")
            self.weight_hh_l0.uniform_(-bound, bound)
            if self.bias_modrelu_l0 is not None:
                self.bias_modrelu_l0.uniform_(-0.01, 0.01)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the cell over a batch of sequences.

        Parameters
        ----------
        input : Tensor, (N, T, F)
            Batch-first, T >= 1.
        hx : Tensor, (1, N, H), optional
            h_0 (default zeros).

        Returns
        -------
        output : Tensor, (N, T, H)
            h_1, ..., h_T, in the parameters' dtype (under autocast, the matrix products' autocast
            dtype promoted with the modReLU bias's).
        h_n : Tensor, (1, N, H)
            h_T.

        Raises
        ------
        ValueError
            ``input`` not 3-D with F = ``input_size`` and T >= 1, or ``hx`` of another shape.
        """
        if input.dim() != 3 or input.shape[-1] != self.input_size or input.shape[1] < 1:
            raise ValueError(
                f"ModReLURNN expects input (N, T, {self.input_size}) with T >= 1; got {tuple(input.shape)}"
            )
        N, T, _ = input.shape
        # every parameter read once: a parametrised weight is evaluated here, not per step
        w_ih, w_hh, b = self.weight_ih_l0, self.weight_hh_l0, self.bias_modrelu_l0
        w_hh_t = w_hh.t()
        xs = torch.matmul(input.transpose(0, 1), w_ih.t())  # (T, N, H): W_ih x_t of every step at once
        if hx is None:
            h = xs.new_zeros(N, self.hidden_size)
        else:
            if hx.shape != (1, N, self.hidden_size):
                raise ValueError(f"hx must be (1, {N}, {self.hidden_size}); got {tuple(hx.shape)}")
            h = hx[0]
        outs = []
        for t in range(T):
            z = torch.addmm(xs[t], h, w_hh_t)
            h = z if b is None else modrelu(z, b)
            outs.append(h)
        return torch.stack(outs, 1), h.unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, nonlinearity=modrelu, bias={self.bias}, batch_first=True"
        )


def make_plain(
    cell: str, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, nonlinearity: str
) -> nn.Module:
    """The plain batch-first module of ``cell`` with PyTorch's default initialisation.

    ``nonlinearity`` (``"tanh"``, ``"relu"`` or ``"modrelu"``) is used by the ``rnn`` cell
    only: ``nn.RNN`` for tanh and relu, :class:`ModReLURNN` (its own initialisation; one layer,
    unidirectional) for modrelu.  Draws from the global random stream exactly as the
    constructor does.

    Raises
    ------
    ValueError
        Unknown cell or nonlinearity; modrelu with ``num_layers`` other than 1 or bidirectional.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; allowed: {', '.join(CELLS)}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; allowed: {', '.join(NONLINEARITIES)}")
    if cell == "rnn" and nonlinearity == MODRELU:
        return ModReLURNN(input_size, hidden_size, num_layers, bidirectional=bidirectional)
    extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    return CELLS[cell](
        input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional, **extra
    )


def plain_class(module: nn.Module) -> tuple[type[nn.Module], dict]:
    """The plain class of a recurrent module (nn's, cdcore's, CDOpt's, :class:`ModReLURNN`,
    parametrised or not) and the extra constructor arguments it needs (``nonlinearity`` for an
    ``nn.RNN``), from its ``mode``."""
    if module.mode == ModReLURNN.mode:
        return ModReLURNN, {}
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
