"""StiefelLSTM / StiefelGRU / StiefelRNN: equal to CDOpt, an nn module for every parameter."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from rnn_reference import (
    CELL_GRANULARITIES,
    CELLS,
    formula_A,
    formula_penalty,
    perturb,
    plain_twin,
    reference_forward,
)
from torch import nn

import cdcore
from cdcore import dissolving, stiefel

pytestmark = pytest.mark.usefixtures("f64")

CELL_NAMES = list(CELLS)


def make(cell, *args, granularity="stacked", penalty_param=0.5, **kwargs):
    return CELLS[cell][0](*args, penalty_param=penalty_param, granularity=granularity, **kwargs)


# -- CDOpt 0.5.5 ----------------------------------------------------------------------------
CDOPT_CONFIGS = [(L, bi, bf) for L in (1, 2, 3) for bi in (False, True) for bf in (False, True)]


def _cdopt_twin(cell, ours, **kw):
    cdnn = pytest.importorskip("cdopt.nn")
    from cdopt.manifold_torch import stiefel_torch

    cls = {"lstm": cdnn.LSTM_cdopt, "gru": cdnn.GRU_cdopt, "rnn": cdnn.RNN_cdopt}[cell]
    ref = cls(
        ours.input_size,
        ours.hidden_size,
        ours.num_layers,
        batch_first=ours.batch_first,
        bidirectional=ours.bidirectional,
        manifold_class=stiefel_torch,
        penalty_param=ours.penalty_param,
        dtype=torch.float64,
        **kw,
    )
    with torch.no_grad():
        for name in ours._flat_weights_names:
            getattr(ref, name).copy_(getattr(ours, name))
    return ref, cdnn


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", CDOPT_CONFIGS)
def test_matches_cdopt(cell, num_layers, bidirectional, batch_first):
    torch.manual_seed(0)
    n_in, H, T, N = 5, 6, 7, 3
    ours = make(cell, n_in, H, num_layers, batch_first=batch_first, bidirectional=bidirectional)
    perturb(ours)
    ref, cdnn = _cdopt_twin(cell, ours)
    x = torch.randn((N, T, n_in) if batch_first else (T, N, n_in))
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), N, H)
    hx = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    for state in (None, hx):
        out, hidden = ours(x, state)
        out_r, hidden_r = ref(x, state)
        assert torch.allclose(out, out_r, atol=1e-10, rtol=0)
        for h, h_r in zip(hidden if cell == "lstm" else [hidden], hidden_r if cell == "lstm" else [hidden_r]):
            assert torch.allclose(h, h_r, atol=1e-10, rtol=0)
    pen, pen_r = cdcore.quad_penalty(ours), cdnn.get_quad_penalty(ref)
    assert abs(pen.item() - pen_r.item()) < 1e-10
    assert pen.item() > 1e-3  # the raw weights really are off the manifold


def test_relu_rnn_matches_cdopt():
    torch.manual_seed(1)
    ours = cdcore.StiefelRNN(4, 5, 2, nonlinearity="relu", bidirectional=True, penalty_param=0.3)
    perturb(ours)
    ref, _ = _cdopt_twin("rnn", ours, nonlinearity="relu")
    x = torch.randn(6, 2, 4)
    assert torch.allclose(ours(x)[0], ref(x)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_state_dicts_are_interchangeable_with_plain_and_cdopt(cell):
    ours = make(cell, 3, 4, 2, bidirectional=True)
    plain = CELLS[cell][1](3, 4, 2, bidirectional=True)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert all(a.shape == b.shape for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    ours.load_state_dict(plain.state_dict())  # strict
    assert torch.equal(ours.weight_hh_l1_reverse, plain.weight_hh_l1_reverse)
    plain.load_state_dict(make(cell, 3, 4, 2, bidirectional=True).state_dict())
    ref, _ = _cdopt_twin(cell, ours)
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_state_dict_of_the_parametrize_layout_loads(cell):
    # cdbench <= 0.1.0 stored the raw weights as parametrizations.<name>.original
    ours = make(cell, 3, 4, 2)
    perturb(ours)
    old = {
        (f"parametrizations.{k}.original" if k in ours.dissolved_names else k): v.clone()
        for k, v in ours.state_dict().items()
    }
    fresh = make(cell, 3, 4, 2)
    fresh.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()))


# -- what the forward computes ----------------------------------------------------------------
@pytest.mark.parametrize("cell,granularity", CELL_GRANULARITIES)
def test_forward_equals_plain_module_holding_A(cell, granularity):
    # See Note [flat-weight swap]: the kernel must receive A(W), computed from the raw weights
    m = make(cell, 3, 4, 2, bidirectional=True, granularity=granularity)
    perturb(m)
    x = torch.randn(6, 2, 3)
    out, hidden = m(x)
    out_r, hidden_r, _ = reference_forward(m, x)
    assert torch.allclose(out, out_r, atol=1e-12)
    for a, b in zip(hidden if cell == "lstm" else [hidden], hidden_r if cell == "lstm" else [hidden_r]):
        assert torch.allclose(a, b, atol=1e-12)
    assert not torch.allclose(
        out, CELLS[cell][1].forward(m, x)[0], atol=1e-6
    )  # raw weights give another output


@pytest.mark.parametrize("cell,granularity", CELL_GRANULARITIES)
def test_gradients_of_every_parameter_equal_the_reference(cell, granularity):
    m = make(cell, 3, 4, 2, bidirectional=True, granularity=granularity)
    perturb(m)
    x = torch.randn(6, 2, 3)
    (m(x)[0].square().sum() + cdcore.quad_penalty(m)).backward()
    out_r, _, leaves = reference_forward(m, x)
    (
        out_r.square().sum() + formula_penalty([leaves[n] for n in m.dissolved_names], granularity, 0.5)
    ).backward()
    for name in m._flat_weights_names:
        assert torch.allclose(getattr(m, name).grad, leaves[name].grad, atol=1e-10), name
        assert getattr(m, name).grad.abs().sum() > 0


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_every_recurrent_weight_is_dissolved_and_counted(cell):
    m = make(cell, 4, 3, num_layers=3, bidirectional=True, penalty_param=1.0)
    expected = [f"weight_hh_l{k}{s}" for k in range(3) for s in ("", "_reverse")]
    assert m.dissolved_names == expected
    assert [w.name for w in cdcore.dissolved_weights(m)] == expected
    assert [w.name for w in cdcore.dissolved_weights(nn.Sequential(m))] == [f"0.{n}" for n in expected]
    perturb(m)
    base = cdcore.quad_penalty(m).item()
    assert base == pytest.approx(formula_penalty(m._raw_weights(), "stacked", 1.0).item(), rel=1e-12)
    for name in expected:  # each weight contributes: putting it back on the manifold lowers the penalty
        mm = copy.deepcopy(m)
        with torch.no_grad():
            getattr(mm, name).copy_(stiefel.projx(getattr(mm, name)))
        assert cdcore.quad_penalty(mm).item() < base - 1e-6


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_per_gate_granularity(cell):
    g = CELLS[cell][2]
    m = make(cell, 3, 4, granularity="per_gate")
    raw = m.weight_hh_l0
    assert stiefel.feasibility(raw.view(g, 4, 4)).max() < 1e-12  # each gate block orthogonal
    assert stiefel.feasibility(raw).item() > 1.0  # but not the stacked matrix
    perturb(m)
    expected = 0.5 * dissolving.quad_penalty_value(raw.view(g, 4, 4)).sum()
    assert torch.allclose(cdcore.quad_penalty(m), expected)


def test_rnn_has_no_gates():
    with pytest.raises(
        ValueError, match="StiefelRNN has no gates: granularity must be 'stacked'.*'per_gate'"
    ):
        cdcore.StiefelRNN(3, 4, penalty_param=0.5, granularity="per_gate")
    with pytest.raises(ValueError, match="no gates"):
        cdcore.StiefelRNN.from_rnn(nn.RNN(3, 4), penalty_param=0.5, granularity="per_gate")
    m = cdcore.StiefelRNN(3, 4, penalty_param=0.5)
    assert stiefel.feasibility(m.weight_hh_l0).item() < 1e-12  # on O(4)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_effective_weights_are_what_the_kernel_gets(cell):
    m = make(cell, 3, 4, 2, bidirectional=True)
    perturb(m)
    weights, penalty = m.effective_weights()
    for name, A in zip(m.dissolved_names, weights):
        assert torch.allclose(A, formula_A(getattr(m, name), "stacked"), atol=1e-14)
    assert torch.allclose(penalty, cdcore.quad_penalty(m), atol=1e-14)
    assert all(w.requires_grad for w in weights) and penalty.requires_grad


# -- dtype, device, copies ----------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_dtype_moves_state_dict_deepcopy_and_pickle(cell):
    m = make(cell, 3, 4, 2, bidirectional=True).float()
    assert all(t.dtype == torch.float32 for t in m.parameters())
    assert m(torch.randn(5, 2, 3, dtype=torch.float32))[0].dtype == torch.float32
    m = m.double()
    assert all(w.dtype == torch.float64 for w in m._flat_weights)
    if torch.cuda.is_available():
        assert all(t.is_cuda for t in copy.deepcopy(m).to("cuda").parameters())
    perturb(m)
    x = torch.randn(5, 2, 3)
    y = m(x)[0]  # a forward leaves no non-leaf tensors behind: deepcopy and pickle work
    assert torch.equal(copy.deepcopy(m)(x)[0], y)
    assert torch.equal(pickle.loads(pickle.dumps(m))(x)[0], y)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = make(cell, 3, 4, 2, bidirectional=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x)[0], y)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_half_precision_parameters(cell):
    m = make(cell, 3, 8, 2).to(torch.bfloat16)
    perturb(m, scale=0.1)
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    out, _ = m(x)
    assert out.dtype == torch.bfloat16
    weights, penalty = m.effective_weights()
    assert all(w.dtype == torch.bfloat16 for w in weights)
    assert penalty.dtype == torch.float32  # the constraint arithmetic runs in float32
    expected = formula_penalty([getattr(m, n).float() for n in m.dissolved_names], "stacked", 0.5)
    assert torch.allclose(cdcore.quad_penalty(m), expected.float(), rtol=1e-5)
    (out.float().sum() + cdcore.quad_penalty(m)).backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in m.parameters())


# -- import / export -----------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_to_plain_exports_feasible_plain_module(cell):
    m = make(cell, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    plain = getattr(m, f"to_{cell}")()
    assert type(plain) is CELLS[cell][1]
    assert torch.allclose(plain(x)[0], m(x)[0], atol=1e-12)  # on the manifold A = id
    perturb(m)
    state = torch.random.get_rng_state()
    plain = m.to_plain()
    assert torch.equal(torch.random.get_rng_state(), state)
    for n in m.dissolved_names:
        assert stiefel.feasibility(getattr(plain, n)).item() < 1e-12
        assert torch.allclose(getattr(plain, n), stiefel.projx(getattr(m, n)), atol=1e-12)
    assert torch.equal(plain.weight_ih_l1, m.weight_ih_l1)


def test_to_rnn_keeps_the_nonlinearity():
    m = cdcore.StiefelRNN(3, 4, nonlinearity="relu", penalty_param=0.5)
    assert m.to_rnn().nonlinearity == "relu"
    assert (
        cdcore.StiefelRNN.from_rnn(nn.RNN(3, 4, nonlinearity="relu"), penalty_param=0.5).nonlinearity
        == "relu"
    )


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_from_plain_copies_projects_and_keeps_the_random_stream(cell):
    torch.manual_seed(0)
    plain = CELLS[cell][1](3, 4, num_layers=2, bidirectional=True, batch_first=True)
    state = torch.random.get_rng_state()
    m = getattr(CELLS[cell][0], f"from_{cell}")(plain, penalty_param=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert m.batch_first and m.bidirectional and m.num_layers == 2
    assert torch.equal(m.weight_ih_l1_reverse, plain.weight_ih_l1_reverse)
    assert torch.allclose(m.weight_hh_l0, stiefel.projx(plain.weight_hh_l0))
    other = CELLS["gru" if cell != "gru" else "lstm"][1](3, 4)
    with pytest.raises(ValueError, match=f"converts an nn.{CELLS[cell][1].__name__}; got"):
        CELLS[cell][0].from_plain(other, penalty_param=0.5)


# -- arguments -----------------------------------------------------------------------------
def test_proj_size_is_refused_with_value_error():
    with pytest.raises(ValueError, match="proj_size must be 0 for a StiefelLSTM.*got 2"):
        cdcore.StiefelLSTM(3, 4, proj_size=2, penalty_param=0.5)
    with pytest.raises(ValueError, match="proj_size must be 0"):
        cdcore.StiefelLSTM.from_lstm(nn.LSTM(3, 4, proj_size=2), penalty_param=0.5)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bad_arguments_raise(cell):
    with pytest.raises(ValueError, match="granularity must be one of"):
        make(cell, 3, 4, granularity="rows")
    with pytest.raises(ValueError, match="penalty_param"):
        make(cell, 3, 4, penalty_param=-1.0)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_zero_penalty_warns_once_per_module_at_the_callers_line(cell):
    with pytest.warns(UserWarning, match="penalty_param=0 .*nothing pulls W back") as record:
        make(cell, 3, 4, 3, bidirectional=True, penalty_param=0.0)
    assert len(record) == 1  # one warning for six recurrent weights
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="penalty_param=0") as record:
        CELLS[cell][0].from_plain(CELLS[cell][1](3, 4), penalty_param=0.0)
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(cell, 3, 4, penalty_param=0.1)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_unbatched_and_packed_inputs_work(cell):
    m = make(cell, 3, 4)
    assert m(torch.randn(5, 3))[0].shape == (5, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    out, _ = m(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    ref, _, _ = reference_forward(m, packed)
    assert torch.allclose(out.data, ref.data, atol=1e-12)


# -- every parameter behaves as in the plain module ---------------------------------------------
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_functional_call_honours_every_parameter(cell):
    # See Note [flat-weight swap]
    m = make(cell, 3, 4, 2)
    perturb(m)
    x = torch.randn(5, 2, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for name in m._flat_weights_names:
        m.zero_grad(set_to_none=True)
        swapped = {name: (0.3 * torch.randn(getattr(m, name).shape, generator=g)).requires_grad_()}
        out, _ = torch.func.functional_call(m, swapped, (x,))
        out_r, _, leaves = reference_forward(m, x, params=swapped)
        assert torch.allclose(out, out_r, atol=1e-12), name
        out.square().sum().backward()
        out_r.square().sum().backward()
        assert torch.allclose(swapped[name].grad, leaves[name].grad, atol=1e-10), name
        assert getattr(m, name).grad is None  # the module's own weight was not used
    every = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    assert torch.allclose(
        torch.func.functional_call(m, every, (x,))[0], reference_forward(m, x, params=every)[0], atol=1e-12
    )
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # restored untouched


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_parametrisation_on_input_weight_is_honoured(cell):
    # See Note [flat-weight swap]
    from torch.nn.utils.parametrizations import weight_norm

    m = make(cell, 3, 4, 2)
    weight_norm(m, "weight_ih_l0")
    x = torch.randn(5, 2, 3)
    y0, _ = m(x)
    with torch.no_grad():
        m.parametrizations.weight_ih_l0.original0.mul_(2.0)  # the norm g doubles the weight
    y1, _ = m(x)
    assert not torch.allclose(y0, y1)
    assert torch.allclose(y1, reference_forward(m, x)[0], atol=1e-12)
    y1.sum().backward()
    assert m.parametrizations.weight_ih_l0.original0.grad is not None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_deepcopy_and_pickle_with_parametrised_input_weight(cell):
    # See Note [flat-weight swap]: _init_flat_weights keeps only leaves, so after .to() no
    # evaluated parametrisation (a non-leaf tensor) stays on the module
    from torch.nn.utils.parametrizations import weight_norm

    m = make(cell, 3, 4, 2)
    weight_norm(m, "weight_ih_l0")
    m = m.float().double()
    assert all(w is None or w.is_leaf for w in m._flat_weights)
    x = torch.randn(5, 2, 3)
    assert torch.equal(copy.deepcopy(m)(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_torch_func_grad_vmap_jacrev_through_the_module(cell):
    m = make(cell, 3, 4, 1)
    perturb(m)
    x = torch.randn(5, 2, 3)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(m, p, (x,))[0].square().sum()

    grads = torch.func.grad(loss)(params, x)
    m.zero_grad()
    loss(dict(m.named_parameters()), x).backward()
    for k, p in m.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-12), k
    # vmap through the module works exactly where it works for the plain module: torch 2.14 has
    # no batching rule for the fused kernels (aten::lstm / gru / rnn_tanh), so both raise the same
    xs = torch.randn(3, 5, 2, 3)
    plain = CELLS[cell][1](3, 4, 1)
    try:
        torch.func.vmap(plain)(xs)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match="Batching rule not implemented"):
            torch.func.vmap(lambda x: m(x)[0])(xs)
        assert "Batching rule not implemented" in str(e)
    else:
        batched = torch.func.vmap(lambda x: torch.func.functional_call(m, params, (x,))[0])(xs)
        assert torch.allclose(batched, torch.stack([m(x)[0] for x in xs]), atol=1e-12)
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(m, {"weight_hh_l0": w}, (x,))[0])(
        params["weight_hh_l0"]
    )

    twin = plain_twin(m)
    fixed = {k: v for k, v in params.items() if k != "weight_hh_l0"}

    def reference(w):  # autograd of the plain formula through the plain module
        return torch.func.functional_call(twin, {**fixed, "weight_hh_l0": formula_A(w, "stacked")}, (x,))[0]

    jac_r = torch.autograd.functional.jacobian(reference, params["weight_hh_l0"])
    assert torch.allclose(jac, jac_r, atol=1e-10)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_jit_trace_follows_the_weights_and_script_is_refused(cell):
    m = make(cell, 3, 4, 2)
    perturb(m)
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        traced = torch.jit.trace(m, (x,))
    assert torch.allclose(traced(x)[0], m(x)[0], atol=1e-14)
    with torch.no_grad():
        m.weight_hh_l0.add_(0.1)  # the trace reads the raw weights: A(W) is not baked in
        assert torch.allclose(traced(x)[0], reference_forward(m, x)[0], atol=1e-12)
    traced(x)[0].sum().backward()
    assert m.weight_hh_l0.grad is not None
    with pytest.raises(RuntimeError, match="cannot be scripted with torch.jit.script.*torch.jit.trace"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(m)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_torch_compile_aot_eager(cell):
    # dynamo tracing and AOT autograd of the forward with the dissolving autograd.Function
    m = make(cell, 3, 4, 2)
    perturb(m)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x)[0]
    assert torch.allclose(out, reference_forward(m, x)[0], atol=1e-12)
    out.sum().backward()
    grad = m.weight_hh_l0.grad.clone()
    m.zero_grad()
    m(x)[0].sum().backward()
    assert torch.allclose(grad, m.weight_hh_l0.grad, atol=1e-12)
    with torch.no_grad():
        m.weight_hh_l0.add_(0.1)
        assert torch.allclose(compiled(x)[0], reference_forward(m, x)[0], atol=1e-12)


@pytest.mark.slow  # inductor compiles C++ for the graph: 20-60 s on a 2-core CPU
def test_torch_compile_inductor():
    m = cdcore.StiefelLSTM(3, 4, 2, penalty_param=0.5).float()
    perturb(m)
    x = torch.randn(5, 2, 3, dtype=torch.float32)
    compiled = torch.compile(m)
    out = compiled(x)[0]
    assert torch.allclose(out, m(x)[0], atol=1e-5)
    out.sum().backward()
