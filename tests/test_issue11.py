"""One regression test per case of issue 11 items 1-5, on the issue's own inputs.

``m = cdcore.StiefelLSTM(3, 8, 1, batch_first=True, penalty_param=0.5)``, ``x = torch.randn(2, 5, 3)``,
float32.  Each test failed on the code before the fix (cdbench 0.1.0, commit 63535ac).
"""

import pytest
import torch
from rnn_reference import formula_A, formula_penalty, raw_weight
from torch import nn

import cdcore
from cdcore import optim, stiefel
from cdcore.support import autocast_unsupported

#: why this platform's own nn.LSTM cannot run bf16 autocast (None: it can); the contract test
#: where it cannot is in tests/test_rnn_amp.py (the Stiefel module runs where the plain one does)
NO_BF16_LSTM = autocast_unsupported("lstm", "cpu", torch.bfloat16)


@pytest.fixture
def m():
    torch.manual_seed(0)
    return cdcore.StiefelLSTM(3, 8, 1, batch_first=True, penalty_param=0.5)


@pytest.fixture
def x():
    return torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))


def _lstm_holding_A(m):
    """An nn.LSTM holding A(W) of the current raw weights (plain formula) and every other weight."""
    ref = nn.LSTM(3, 8, 1, batch_first=True)
    with torch.no_grad():
        for name in ref._flat_weights_names:
            w = raw_weight(m, name) if name.startswith("weight_hh") else getattr(m, name)
            getattr(ref, name).copy_(formula_A(w, "stacked") if name.startswith("weight_hh") else w)
    return ref


def _perturb(m):
    with torch.no_grad():
        raw_weight(m, "weight_hh_l0").add_(
            0.05 * torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
        )


# -- 1. stale effective weights ------------------------------------------------------------------
def test_case_1_fused_adam_step_then_no_grad_forward_is_not_stale(m, x):
    with torch.no_grad():
        m(x)  # evaluation before the step
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
    m(x)[0].square().mean().backward()
    opt.step()
    with torch.no_grad():
        out = m(x)[0]
        assert (out - _lstm_holding_A(m)(x)[0]).abs().max().item() < 1e-6


def test_case_1_data_edit_is_seen_by_output_and_penalty(m, x):
    with torch.no_grad():
        m(x)
    cdcore.quad_penalty(m)
    raw_weight(m, "weight_hh_l0").data.add_(0.05)
    with torch.no_grad():
        assert (m(x)[0] - _lstm_holding_A(m)(x)[0]).abs().max().item() < 1e-6
    expected = formula_penalty([raw_weight(m, "weight_hh_l0")], "stacked", 0.5)
    assert cdcore.quad_penalty(m).item() == pytest.approx(expected.item(), rel=1e-5)


# -- 2. the penalty is not tied to the last forward's graph -------------------------------------
def test_case_2_gradient_accumulation_over_two_micro_batches(m, x):
    _perturb(m)
    for _ in range(2):
        loss = cdcore.quad_penalty(m) + m(x)[0].square().mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (cdcore.quad_penalty(m) + m(x)[0].square().mean()).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], 2 * p.grad, atol=1e-6), n


def test_case_2_penalty_backward_after_the_output_backward(m, x):
    _perturb(m)
    o, _ = m(x)
    o.sum().backward()
    cdcore.quad_penalty(m).backward()
    W = raw_weight(m, "weight_hh_l0").detach().clone().requires_grad_()
    formula_penalty([W], "stacked", 0.5).backward()
    W.grad += torch.autograd.grad(_lstm_holding_A_of(m, W)(x).sum(), W)[0]
    assert torch.allclose(raw_weight(m, "weight_hh_l0").grad, W.grad, atol=1e-5)


def _lstm_holding_A_of(m, W):
    ref = _lstm_holding_A(m)
    return lambda x: torch.func.functional_call(ref, {"weight_hh_l0": formula_A(W, "stacked")}, (x,))[0]


# -- 3. mixed precision --------------------------------------------------------------------------
@pytest.mark.skipif(bool(NO_BF16_LSTM), reason=str(NO_BF16_LSTM))
def test_case_3_bf16_autocast_backward(m, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x)[0].float().square().mean() + cdcore.quad_penalty(m)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.skipif(bool(NO_BF16_LSTM), reason=str(NO_BF16_LSTM))
def test_case_3_no_grad_autocast_forward_then_float32_forward(m, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    with torch.no_grad():
        out = m(x)[0]  # plain float32 evaluation after the autocast one
    assert out.dtype == torch.float32
    assert torch.allclose(out, _lstm_holding_A(m)(x)[0], atol=1e-6)


# -- 4. the nn.LSTM contract for every parameter -------------------------------------------------
@pytest.mark.parametrize("name", ["weight_ih_l0", "bias_ih_l0"])
def test_case_4_functional_call_with_a_swapped_weight_is_honoured(m, x, name):
    swapped = (getattr(m, name).detach() + 0.5).requires_grad_()
    out = torch.func.functional_call(m, {name: swapped}, (x,))[0]
    ref = _lstm_holding_A(m)
    assert not torch.allclose(out, ref(x)[0])
    assert torch.allclose(out, torch.func.functional_call(ref, {name: swapped}, (x,))[0], atol=1e-6)
    out.sum().backward()
    assert swapped.grad is not None and swapped.grad.abs().sum() > 0


def test_case_4_weight_norm_on_weight_ih_is_used_by_the_forward(m, x):
    from torch.nn.utils.parametrizations import weight_norm

    weight_norm(m, "weight_ih_l0")
    before = m(x)[0]
    with torch.no_grad():
        m.parametrizations.weight_ih_l0.original0.mul_(3.0)
    assert not torch.allclose(m(x)[0], before)


def test_case_4_torch_func_grad_vmap_jacrev_through_the_dissolving_map():
    X = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(3))
    A = cdcore.dissolving.dissolve_map
    assert torch.allclose(torch.func.vmap(A)(X), A(X))
    assert torch.func.grad(lambda X: A(X).sum())(X[0]).shape == (8, 3)
    assert torch.func.jacrev(A)(X[0]).shape == (8, 3, 8, 3)


# -- 5. CayleyAdam ---------------------------------------------------------------------------------
def test_case_5_late_first_gradient_gets_its_own_bias_correction():
    g = torch.Generator().manual_seed(4)
    p = nn.Parameter(stiefel.random_point(6, 3, generator=g))
    q = nn.Parameter(stiefel.random_point(6, 3, generator=g))
    opt = optim.CayleyAdam([{"params": [p, q], "stiefel": True}], lr=0.05)
    for _ in range(5):
        p.grad = torch.randn(6, 3, generator=g)
        opt.step()
    q0 = q.detach().clone()
    p.grad, q.grad = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    opt.step()
    # Adam's first step has |m_hat / sqrt(v_hat)| = 1 per matrix (RMS): it moves about lr sqrt(n p) = 0.21
    assert torch.linalg.matrix_norm(q.detach() - q0).item() > 0.2


def test_case_5_nan_gradient_raises_and_the_weight_stays_finite():
    p = nn.Parameter(stiefel.random_point(6, 3, generator=torch.Generator().manual_seed(5)))
    opt = optim.CayleyAdam([{"params": [p], "stiefel": True}], lr=0.05)
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    assert torch.isfinite(p).all()


def test_case_5_optimiser_wide_weight_decay_is_accepted():
    p = nn.Parameter(stiefel.random_point(6, 3, generator=torch.Generator().manual_seed(6)))
    e = nn.Parameter(torch.ones(3))
    opt = optim.CayleyAdam([{"params": [p], "stiefel": True}, {"params": [e]}], lr=0.05, weight_decay=0.1)
    p.grad, e.grad = torch.zeros_like(p), torch.zeros_like(e)
    opt.step()
    assert torch.all(e < 1)  # decayed: the Euclidean group got it
    assert stiefel.feasibility(p.detach()).item() < 1e-5


def test_case_5_add_param_group_validates():
    opt = optim.CayleyAdam([nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="granularity must be one of"):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.randn(6, 3))], "stiefel": True, "granularity": "x"}
        )
    with pytest.raises(ValueError, match="n >= p"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 6))], "stiefel": True})
    assert len(opt.param_groups) == 1


def test_case_5_3d_weight_with_per_gate_steps_or_is_refused_at_construction():
    blocks = stiefel.random_point(4, 4, 2, 4, generator=torch.Generator().manual_seed(7))
    w = nn.Parameter(blocks.reshape(2, 16, 4).clone())
    opt = optim.CayleyAdam([{"params": [w], "stiefel": True, "granularity": "per_gate"}], lr=0.05)
    w.grad = torch.randn_like(w)
    opt.step()
    assert stiefel.feasibility(w.detach().reshape(8, 4, 4)).max().item() < 1e-5


def test_case_5_lr_zero_is_allowed():
    optim.CayleyAdam([nn.Parameter(torch.randn(6, 3))], lr=0)
    optim.CayleySGD([nn.Parameter(torch.randn(6, 3))], lr=0)


def test_case_5_proj_size_is_a_value_error():
    with pytest.raises(ValueError, match="proj_size"):
        cdcore.StiefelLSTM(3, 8, 1, proj_size=2, penalty_param=0.5)


def test_case_5_zero_penalty_warns_once_at_the_callers_line():
    with pytest.warns(UserWarning, match="penalty_param=0") as record:
        cdcore.StiefelLSTM(3, 8, 2, bidirectional=True, penalty_param=0.0)
    assert len(record) == 1 and record[0].filename == __file__
