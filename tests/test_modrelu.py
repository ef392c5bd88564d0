"""The modReLU cell (``--cell rnn --nonlinearity modrelu``, :class:`bench.cells.ModReLURNN`).

Checked against a from-scratch reference written from the paper's piecewise definition of
modReLU (Arjovsky, Shah & Bengio 2016, eq. (8): (|z| + b) z / |z| where |z| + b >= 0, else 0),
one sequence and one time step at a time, on shapes and inputs drawn by hypothesis; then
gradients reach every parameter, a parametrised recurrent weight is evaluated once per forward
(not once per step) for every method that parametrises it, cd and cdopt compute the same
model on it, and bad settings are refused.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from bench import cells
from bench.cells import ModReLURNN
from bench.methods import METHODS
from bench.runner import RunConfig, build, get_task


def reference_modrelu(z: float, b: float) -> float:
    """sigma(z) = (|z| + b) z / |z| if |z| + b >= 0 else 0 (sigma(0) = 0), one real number."""
    if z == 0 or abs(z) + b < 0:
        return 0.0
    return (abs(z) + b) * z / abs(z)


def reference_rnn(x, w_ih, w_hh, b, h0):
    """h_t = modReLU(W_ih x_t + W_hh h_{t-1}; b), sequence by sequence, step by step, in float64 lists."""
    N, T, _ = x.shape
    H = w_hh.shape[0]
    out = torch.zeros(N, T, H, dtype=torch.float64)
    for n in range(N):
        h = h0[n].tolist()
        for t in range(T):
            z = [
                sum(w_ih[i, k].item() * x[n, t, k].item() for k in range(x.shape[2]))
                + sum(w_hh[i, j].item() * h[j] for j in range(H))
                for i in range(H)
            ]
            h = [reference_modrelu(z[i], b[i].item()) for i in range(H)]
            out[n, t] = torch.tensor(h, dtype=torch.float64)
    return out


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 3),
    T=st.integers(1, 6),
    F=st.integers(1, 4),
    H=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    with_hx=st.booleans(),
    bias_scale=st.sampled_from([0.01, 0.5]),
)
def test_forward_equals_the_reference(N, T, F, H, seed, with_hx, bias_scale):
    torch.manual_seed(seed)
    m = ModReLURNN(F, H, dtype=torch.float64)
    with torch.no_grad():  # a larger |b| than the init's 0.01 exercises the zeroed coordinates
        m.bias_modrelu_l0.uniform_(-bias_scale, bias_scale)
    x = torch.randn(N, T, F, dtype=torch.float64)
    hx = torch.randn(1, N, H, dtype=torch.float64) if with_hx else None
    out, h_n = m(x, hx)
    assert out.shape == (N, T, H) and h_n.shape == (1, N, H) and out.dtype == torch.float64
    h0 = hx[0] if with_hx else torch.zeros(N, H, dtype=torch.float64)
    ref = reference_rnn(x, m.weight_ih_l0, m.weight_hh_l0, m.bias_modrelu_l0, h0)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(h_n[0], out[:, -1])


def test_modrelu_function_is_the_papers_piecewise_definition():
    z = torch.tensor([-2.0, -0.3, -0.05, 0.0, 0.05, 0.3, 2.0], dtype=torch.float64)
    for b in (-0.1, 0.0, 0.1):
        got = cells.modrelu(z, torch.full((7,), b, dtype=torch.float64))
        assert got.tolist() == pytest.approx([reference_modrelu(v, b) for v in z.tolist()], abs=1e-15)


def test_without_bias_the_cell_is_linear():
    torch.manual_seed(0)
    m = ModReLURNN(3, 4, bias=False, dtype=torch.float64)
    assert m.bias_modrelu_l0 is None and m._flat_weights_names == ["weight_ih_l0", "weight_hh_l0"]
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    h = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        h = x[:, t] @ m.weight_ih_l0.T + h @ m.weight_hh_l0.T
    torch.testing.assert_close(m(x)[1][0], h)


def test_initialisation_follows_exprnn():
    torch.manual_seed(0)
    m = ModReLURNN(10, 256)
    assert [n for n, _ in m.named_parameters()] == m._flat_weights_names
    assert m._flat_weights_names == ["weight_ih_l0", "weight_hh_l0", "bias_modrelu_l0"]
    assert m.weight_ih_l0.std().item() == pytest.approx((2 / 10) ** 0.5, rel=0.05)  # kaiming normal, relu
    assert m.weight_hh_l0.abs().max() <= 1 / 256**0.5  # nn.RNN's U(-1/sqrt(H), 1/sqrt(H))
    assert m.bias_modrelu_l0.abs().max() <= 0.01 and m.bias_modrelu_l0.std() > 0.004  # U(-0.01, 0.01)
    # drawn from the global stream: the same seed, the same module
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ModReLURNN(10, 256).parameters()))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = ModReLURNN(3, 6)
    hx = torch.randn(1, 4, 6, requires_grad=True)
    out, h_n = m(torch.randn(4, 7, 3), hx)
    (out.sum() + h_n.pow(2).sum()).backward()
    for name, p in [*m.named_parameters(), ("hx", hx)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_equal_finite_differences():
    torch.manual_seed(1)
    m = ModReLURNN(2, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    params = tuple(m.parameters())

    def f(*ps):
        out, _ = torch.func.functional_call(m, dict(zip(m._flat_weights_names, ps)), (x,))
        return out.pow(2).sum()

    assert torch.autograd.gradcheck(f, params)


class Count(nn.Module):
    """An identity parametrisation that counts its evaluations."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, W):
        self.calls += 1
        return W


def test_a_parametrised_recurrent_weight_is_evaluated_once_per_forward():
    m = ModReLURNN(3, 5)
    count = Count()
    parametrize.register_parametrization(m, "weight_hh_l0", count)
    count.calls = 0
    m(torch.randn(2, 11, 3))  # 11 time steps
    assert count.calls == 1
    m(torch.randn(2, 4, 3))[0].sum().backward()
    assert count.calls == 2


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_evaluates_its_parametrisation_once_per_forward(method):
    """Every parametrisation the methods attach (geotorch's, cd's Dissolve, CDOpt's) runs once per
    forward of the harness's model on an 11-step sequence (a module forward hook counts its calls)."""
    if not METHODS[method].available():
        pytest.skip(f"{method} needs {METHODS[method].requires}")
    cfg = RunConfig(
        method=method,
        task="digits",
        num_layers=1,
        hidden_size=6,
        bidirectional=False,
        cell="rnn",
        nonlinearity="modrelu",
        penalty_param=0.5 if METHODS[method].uses_penalty else None,
    )
    model, built = build(cfg, get_task(cfg, None))
    plists = getattr(model.rnn, "parametrizations", {})
    calls = []
    for plist in plists.values():
        for i, p in enumerate(plist):
            p.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    model(torch.randn(3, 11, 8)).sum().backward()
    assert len(calls) == sum(len(p) for p in plists.values())  # 0 for unconstrained and cayley
    assert (len(calls) > 0) == (method not in ("unconstrained", "cayley"))


def test_cd_and_cdopt_compute_the_same_model_on_the_modrelu_cell():
    """cd (cdcore.dissolve) and cdopt (CDOpt's set_constraint_dissolving, stiefel_torch) in float64:
    same start, same outputs and penalty after moving the raw weight off the manifold."""
    if not METHODS["cdopt"].available():
        pytest.skip("cdopt not installed")
    cfg = dict(task="digits", num_layers=1, hidden_size=6, bidirectional=False, cell="rnn")
    cfg.update(nonlinearity="modrelu", penalty_param=0.3, init="henaff")
    task = get_task(RunConfig(method="cd", **cfg), None)
    built = {m: build(RunConfig(method=m, **cfg), task) for m in ("cd", "cdopt")}
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    step = torch.randn(6, 6, dtype=torch.float64) * 0.05
    results = {}
    for m, (model, b) in built.items():
        model.double()
        ((raw, _),) = b.weights().values()
        with torch.no_grad():
            raw.add_(step)
        results[m] = (model(x), b.penalty(), b.weights()["weight_hh_l0"][1])
    for a, c in zip(results["cd"], results["cdopt"]):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert results["cd"][1] > 1e-3  # the raw weights were off the manifold: the penalty is not 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_layers=2), "got num_layers=2; allowed: 1"),
        (dict(bidirectional=True), "got bidirectional=True; allowed: False"),
        (dict(batch_first=False), "got batch_first=False; allowed: True"),
        (dict(hidden_size=0), "sizes must be positive"),
    ],
)
def test_the_module_refuses_what_it_is_not(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModReLURNN(**{"input_size": 3, "hidden_size": 4, **kwargs})


def test_make_plain_refuses_layers_and_directions_for_modrelu():
    with pytest.raises(ValueError, match="got num_layers=2; allowed: 1"):
        cells.make_plain("rnn", 3, 4, 2, False, "modrelu")
    with pytest.raises(ValueError, match="got bidirectional=True; allowed: False"):
        cells.make_plain("rnn", 3, 4, 1, True, "modrelu")


def test_bad_input_shapes_are_refused():
    m = ModReLURNN(3, 4)
    with pytest.raises(ValueError, match=r"expects input \(N, T, 3\)"):
        m(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"hx must be \(1, 2, 4\)"):
        m(torch.randn(2, 5, 3), torch.zeros(2, 4))


def test_make_plain_and_plain_class():
    m = cells.make_plain("rnn", 3, 4, 1, False, "modrelu")
    assert type(m) is ModReLURNN and cells.plain_class(m) == (ModReLURNN, {})
    assert cells.recurrent_names(m) == ["weight_hh_l0"]
    parametrize.register_parametrization(m, "weight_hh_l0", Count())
    assert cells.plain_class(m) == (ModReLURNN, {})  # parametrised: still its plain class
    assert type(cells.make_plain("rnn", 3, 4, 1, False, "relu")) is nn.RNN


def test_dry_run_estimates_from_recorded_runs_of_the_same_cell_only():
    """A folder's recorded throughput of tanh RNN (or LSTM) runs does not estimate modReLU runs."""
    from bench import ablate

    row = dict(status="ok", method="unconstrained", task="digits", num_layers="1", hidden_size="8")
    row.update(bidirectional="False", granularity="stacked", batch_size="32", device="cpu", seq_len="8")
    row.update(amp="", epochs="2", n_train="1000", wall_s="10.0", cell="rnn", nonlinearity="tanh")
    cfg = dict(method="unconstrained", task="digits", num_layers=1, hidden_size=8, bidirectional=False)
    cfg.update(batch_size=32, epochs=2, val_size=360, cell="rnn")
    tanh, modrelu = RunConfig(**cfg), RunConfig(**cfg, nonlinearity="modrelu")
    [(_, _, src_tanh), (_, _, src_modrelu)] = ablate.estimate([tanh, modrelu], [row], None)
    assert (src_tanh, src_modrelu) == ("recorded", "measured")
    [(_, _, src_lstm)] = ablate.estimate([RunConfig(**{**cfg, "cell": "lstm"})], [row], None)
    assert src_lstm == "measured"
