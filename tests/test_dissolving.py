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
    X = (stiefel.random_point(6, 3, generator=torch.Generator().manual_seed(1)) + 0.1 * torch.randn(6, 3))
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
    losses = [lambda A, sq: (A * G).sum() + (w * sq).sum(),
              lambda A, sq: (A * G).sum(),  # penalty unused: its gradient arrives as None
              lambda A, sq: (w * sq).sum()]  # map unused
    for loss in losses:
        got, = torch.autograd.grad(loss(*dissolving.dissolve_with_penalty(X)), X)
        want, = torch.autograd.grad(loss(*_autograd_reference(X)), X)
        assert torch.allclose(got, want, atol=1e-12)


def test_closed_form_backward_is_differentiable_again():
    X = (stiefel.random_point(7, 3, 2, generator=torch.Generator().manual_seed(5)) + 0.2 * torch.randn(2, 7, 3))
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(dissolving.dissolve_with_penalty, (X,))
    assert torch.autograd.gradgradcheck(dissolving.dissolve_with_penalty, (X,))
    # Hessian-vector product of the penalised objective equals the one through autograd of the formula
    V = torch.randn(2, 7, 3)
    hv = []
    for fn in (dissolving.dissolve_with_penalty, _autograd_reference):
        A, sq = fn(X)
        grad, = torch.autograd.grad(A.square().sum() + 0.5 * sq.sum(), X, create_graph=True)
        hv.append(torch.autograd.grad((grad * V).sum(), X)[0])
    assert torch.allclose(hv[0], hv[1], atol=1e-12)


def test_matches_cdopt_jacobian_transpose():
    cdopt_st = pytest.importorskip("cdopt.manifold_torch").stiefel_torch
    M = cdopt_st((8, 3), dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    X, G = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    assert torch.allclose(dissolving.dissolve_vjp(X, stiefel.constraint(X), G, None), M.JA_transpose(X, G),
                          atol=1e-12)


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
    with pytest.warns(UserWarning, match="nothing pulls it back"):
        cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=0.0)
    for bad in (-1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="penalty_param must be a finite number >= 0"):
            cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=bad)
    with pytest.raises(ValueError, match="has no tensor 'wieght'"):
        cdcore.dissolve(nn.Linear(3, 6), "wieght", penalty_param=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdcore.dissolve(nn.Linear(3, 6), "weight", penalty_param=1.0)
