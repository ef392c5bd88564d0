import warnings

import pytest
import torch
from torch import nn

import cdcore
from cdcore import dissolving, stiefel

pytestmark = pytest.mark.usefixtures("f64")


def test_A_is_identity_on_manifold():
    X = stiefel.random_point(12, 5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dissolving.dissolve_map(X), X, atol=1e-13)
    assert dissolving.quad_penalty_value(X).max() < 1e-26


def test_gradcheck_map_and_penalty():
    X = stiefel.random_point(6, 3, generator=torch.Generator().manual_seed(1)) + 0.1 * torch.randn(6, 3)
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(dissolving.dissolve_map, (X,))
    assert torch.autograd.gradcheck(dissolving.quad_penalty_value, (X,))
    assert torch.autograd.gradgradcheck(dissolving.quad_penalty_value, (X,))


def _autograd_reference(X):
    C = X.transpose(-2, -1) @ X - torch.eye(X.shape[-1], dtype=X.dtype)
    return X - 0.5 * (X @ C), C.square().sum(dim=(-2, -1))


@pytest.mark.parametrize("shape", [(9, 4), (3, 10, 10), (2, 3, 8, 2)])
def test_closed_form_backward_equals_autograd_of_the_formula(shape):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(*shape, generator=g, requires_grad=True)
    G = torch.randn(*shape, generator=g)
    w = torch.randn(shape[:-2], generator=g)
    A, sq = dissolving.dissolve_with_penalty(X)
    A_ref, sq_ref = _autograd_reference(X)
    assert torch.allclose(A, A_ref, atol=1e-13) and torch.allclose(sq, sq_ref, atol=1e-12)
    losses = [
        lambda A, sq: (A * G).sum() + (w * sq).sum(),
        lambda A, sq: (A * G).sum(),  # penalty unused: its gradient arrives as None
        lambda A, sq: (w * sq).sum(),
    ]  # map unused
    for loss in losses:
        (got,) = torch.autograd.grad(loss(*dissolving.dissolve_with_penalty(X)), X)
        (want,) = torch.autograd.grad(loss(*_autograd_reference(X)), X)
        assert torch.allclose(got, want, atol=1e-12)


def test_closed_form_backward_is_differentiable_again():
    X = stiefel.random_point(7, 3, 2, generator=torch.Generator().manual_seed(5)) + 0.2 * torch.randn(2, 7, 3)
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(dissolving.dissolve_with_penalty, (X,))
    assert torch.autograd.gradgradcheck(dissolving.dissolve_with_penalty, (X,))
    # Hessian-vector product of the penalised objective equals the one through autograd of the formula
    V = torch.randn(2, 7, 3)
    hv = []
    for fn in (dissolving.dissolve_with_penalty, _autograd_reference):
        A, sq = fn(X)
        (grad,) = torch.autograd.grad(A.square().sum() + 0.5 * sq.sum(), X, create_graph=True)
        hv.append(torch.autograd.grad((grad * V).sum(), X)[0])
    assert torch.allclose(hv[0], hv[1], atol=1e-12)


def test_matches_cdopt_jacobian_transpose():
    cdopt_st = pytest.importorskip("cdopt.manifold_torch").stiefel_torch
    M = cdopt_st((8, 3), dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    X, G = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    assert torch.allclose(
        dissolving.dissolve_vjp(X, stiefel.constraint(X), G, None), M.JA_transpose(X, G), atol=1e-12
    )


def test_matches_cdopt_formulas():
    cdopt_st = pytest.importorskip("cdopt.manifold_torch").stiefel_torch
    M = cdopt_st((8, 3), dtype=torch.float64)
    X = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(dissolving.dissolve_map(X), M.A(X), atol=1e-14)
    assert torch.allclose(dissolving.quad_penalty_value(X), M.C_quad_penalty(X), atol=1e-12)


def test_feasibility_of_A_is_quadratic_near_manifold():
    g = torch.Generator().manual_seed(3)
    X = stiefel.random_point(20, 6, generator=g)
    D = torch.randn(20, 6, generator=g)
    ratios = []
    for eps in (1e-2, 1e-3, 1e-4):
        Y = X + eps * D
        c_y = stiefel.feasibility(Y).item()
        c_ay = stiefel.feasibility(dissolving.dissolve_map(Y)).item()
        ratios.append(c_ay / c_y**2)
        assert c_ay < c_y
    # ||C(A(Y))|| / ||C(Y)||^2 stays bounded as Y approaches the manifold
    assert max(ratios) < 10 * min(ratios) and max(ratios) < 10


def test_blocks_round_trip_and_per_gate_view():
    W = torch.randn(4 * 5, 5)
    assert torch.equal(dissolving.from_blocks(dissolving.to_blocks(W, "per_gate"), "per_gate"), W)
    assert dissolving.to_blocks(W, "per_gate").shape == (4, 5, 5)
    assert torch.equal(dissolving.to_blocks(W, "per_gate")[2], W[10:15])
    assert dissolving.to_blocks(W, "stacked").shape == (1, 20, 5)
    with pytest.raises(ValueError, match="granularity must be one of stacked, per_gate; got 'rows'"):
        dissolving.to_blocks(W, "rows")
    with pytest.raises(ValueError, match="per_gate needs"):
        dissolving.to_blocks(torch.randn(7, 3), "per_gate")


@pytest.mark.parametrize("granularity", ["stacked", "per_gate"])
def test_dissolve_projects_and_penalty_matches(granularity):
    lin = nn.Linear(3, 12)  # weight (12, 3)
    cdcore.dissolve(lin, "weight", penalty_param=0.7, granularity=granularity)
    raw = lin.parametrizations.weight.original
    blocks = dissolving.to_blocks(raw, granularity)
    assert stiefel.feasibility(blocks).max() < 1e-12  # projected on attach
    assert torch.allclose(lin.weight, raw, atol=1e-12)  # A = identity there
    with torch.no_grad():
        raw.add_(0.05 * torch.randn_like(raw))
    expected = 0.7 * dissolving.quad_penalty_value(dissolving.to_blocks(raw, granularity)).sum()
    pen = cdcore.quad_penalty(lin)
    assert torch.allclose(pen, expected)
    assert pen.requires_grad
    feas = cdcore.feasibility(lin)["weight"]
    assert feas["raw"] == pytest.approx((expected.item() / 0.7) ** 0.5)
    assert feas["effective"] < feas["raw"]


def test_quad_penalty_of_plain_model_is_zero():
    assert cdcore.quad_penalty(nn.Linear(2, 2)).item() == 0.0


def test_zero_penalty_warns_and_bad_values_raise():
    with pytest.warns(UserWarning, match="nothing pulls W back") as record:
        cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=0.0)
    assert record[0].filename == __file__
    for bad in (-1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="penalty_param must be a finite number >= 0"):
            cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=bad)
    with pytest.raises(ValueError, match="has no tensor 'wieght'"):
        cdcore.dissolve(nn.Linear(3, 6), "wieght", penalty_param=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=1.0)


# -- torch.func ----------------------------------------------------------------------------------
def _objective(fn):
    def f(X):
        A, sq = fn(X)
        return A.sin().sum() + 0.7 * sq.sum()

    return f


def test_torch_func_grad_vmap_jacrev_jacfwd_hessian_equal_autograd_of_the_formula():
    from torch import func

    g = torch.Generator().manual_seed(7)
    X = torch.randn(3, 7, 4, generator=g)
    ours, ref = _objective(dissolving.dissolve_with_penalty), _objective(_autograd_reference)
    assert torch.allclose(func.grad(ours)(X[0]), func.grad(ref)(X[0]), atol=1e-12)
    assert torch.allclose(func.vmap(dissolving.dissolve_map)(X), _autograd_reference(X)[0], atol=1e-13)
    assert torch.allclose(func.vmap(dissolving.quad_penalty_value)(X), _autograd_reference(X)[1], atol=1e-12)
    assert torch.allclose(func.vmap(func.grad(ours))(X), func.vmap(func.grad(ref))(X), atol=1e-12)
    jac = func.jacrev(dissolving.dissolve_map)(X[0])
    assert torch.allclose(jac, func.jacrev(lambda X: _autograd_reference(X)[0])(X[0]), atol=1e-12)
    assert torch.allclose(func.jacfwd(dissolving.dissolve_map)(X[0]), jac, atol=1e-12)
    hess = func.hessian(ours)(X[0])  # jacfwd(jacrev): forward-mode rule over the closed-form backward
    assert torch.allclose(hess, func.hessian(ref)(X[0]), atol=1e-11)
    assert torch.allclose(func.jacrev(func.jacrev(ours))(X[0]), hess, atol=1e-11)
    penalty_only = func.grad(lambda X: dissolving.quad_penalty_value(X).sum())(X[0])
    assert torch.allclose(
        penalty_only, func.grad(lambda X: _autograd_reference(X)[1].sum())(X[0]), atol=1e-12
    )


def test_forward_mode_and_batched_gradcheck():
    X = stiefel.random_point(6, 3, 2, generator=torch.Generator().manual_seed(8)) + 0.1 * torch.randn(2, 6, 3)
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(
        dissolving.dissolve_with_penalty, (X,), check_forward_ad=True, check_batched_grad=True
    )
    assert torch.autograd.gradcheck(
        dissolving.quad_penalty_value, (X,), check_forward_ad=True, check_batched_grad=True
    )
    assert torch.autograd.gradgradcheck(dissolving.quad_penalty_value, (X,))


# -- mixed precision ---------------------------------------------------------------------------
def test_constraint_arithmetic_runs_in_float32_under_autocast():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(2, 12, 4, generator=g, dtype=torch.float32, requires_grad=True)
    A0, sq0 = dissolving.dissolve_with_penalty(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        A, sq = dissolving.dissolve_with_penalty(X)
        (A.sum() + sq.sum()).backward()  # backward inside the autocast region too
    assert A.dtype == sq.dtype == X.grad.dtype == torch.float32
    assert torch.equal(A, A0) and torch.equal(sq, sq0)  # not rounded to bfloat16
    grad = X.grad.clone()
    X.grad = None
    (A0.sum() + sq0.sum()).backward()
    assert torch.equal(grad, X.grad)
    half = X.detach().to(torch.bfloat16).requires_grad_()
    A_h, sq_h = dissolving.dissolve_with_penalty(half)
    assert A_h.dtype == torch.bfloat16 and sq_h.dtype == torch.float32
    assert torch.allclose(sq_h, _autograd_reference(half.detach().float())[1])
    A_h.float().sum().backward()
    assert half.grad.dtype == torch.bfloat16
    assert dissolving.quad_penalty_value(half).dtype == torch.float32
    assert dissolving.dissolve_map(X.detach().double()).dtype == torch.float64


# -- the parametrize path ----------------------------------------------------------------------
def test_assigning_a_dissolved_weight_is_refused_and_leaves_the_raw_weight():
    lin = cdcore.dissolve(nn.Linear(3, 12), "weight", penalty_param=0.5)
    raw = lin.parametrizations.weight.original
    before = raw.detach().clone()
    with pytest.raises(ValueError, match=r"assign .*'parametrizations\.weight\.original' instead"):
        lin.weight = torch.randn(12, 3)
    assert torch.equal(raw, before)


def test_functional_call_with_the_plain_key_fails_cleanly():
    lin = cdcore.dissolve(nn.Linear(3, 12), "weight", penalty_param=0.5)
    raw = lin.parametrizations.weight.original
    before = raw.detach().clone()
    x = torch.randn(2, 3)
    bias = torch.randn(12)
    with pytest.raises(ValueError, match=r"parametrizations\.weight\.original"):
        torch.func.functional_call(lin, {"bias": bias, "weight": torch.randn(12, 3)}, (x,))
    assert torch.equal(raw, before)  # untouched
    assert lin.parametrizations.weight.original is raw
    assert not torch.equal(lin.bias, bias)  # the swap done before the failing one was undone


def test_functional_call_with_the_raw_key_works():
    lin = cdcore.dissolve(nn.Linear(3, 12), "weight", penalty_param=0.5)
    before = lin.parametrizations.weight.original.detach().clone()
    T = torch.randn(12, 3, requires_grad=True)
    x = torch.randn(2, 3)
    y = torch.func.functional_call(lin, {"parametrizations.weight.original": T}, (x,))
    assert torch.allclose(y, x @ _autograd_reference(T)[0].T + lin.bias, atol=1e-12)
    y.sum().backward()
    T2 = T.detach().clone().requires_grad_()
    (x @ _autograd_reference(T2)[0].T + lin.bias).sum().backward()
    assert torch.allclose(T.grad, T2.grad, atol=1e-12)
    assert torch.equal(lin.parametrizations.weight.original, before)


def test_dissolve_refuses_parametrised_and_owned_weights():
    from torch.nn.utils.parametrizations import weight_norm

    lin = weight_norm(nn.Linear(3, 12))
    with pytest.raises(ValueError, match="already parametrised"):
        cdcore.dissolve(lin, "weight", penalty_param=0.5)
    with pytest.raises(ValueError, match="StiefelLSTM.weight_hh_l0 is already dissolved by its module"):
        cdcore.dissolve(cdcore.StiefelLSTM(3, 4, penalty_param=0.5), "weight_hh_l0", penalty_param=0.5)


def test_both_kinds_in_one_model():
    rnn = cdcore.StiefelGRU(3, 4, penalty_param=0.3, granularity="per_gate")
    head = cdcore.dissolve(nn.Linear(4, 8), "weight", penalty_param=0.7)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    with torch.no_grad():
        rnn.weight_hh_l0.add_(0.1)
        head.parametrizations.weight.original.add_(0.1)
    found = {w.name: w for w in cdcore.dissolved_weights(model)}
    assert list(found) == ["rnn.weight_hh_l0", "head.weight"]
    assert found["rnn.weight_hh_l0"].granularity == "per_gate" and found["head.weight"].penalty_param == 0.7
    assert found["rnn.weight_hh_l0"].raw is rnn.weight_hh_l0
    expected = 0.3 * dissolving.quad_penalty_value(
        rnn.weight_hh_l0.view(3, 4, 4)
    ).sum() + 0.7 * dissolving.quad_penalty_value(head.parametrizations.weight.original)
    assert torch.allclose(cdcore.quad_penalty(model), expected, atol=1e-14)
    assert set(cdcore.feasibility(model)) == {"rnn.weight_hh_l0", "head.weight"}
