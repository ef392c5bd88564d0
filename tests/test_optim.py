import pytest
import torch
from torch import nn

from cdcore import optim, stiefel


def _procrustes(n, p, batch=(), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X0 = stiefel.random_point(n, p, *batch, generator=g, dtype=dtype)
    target = torch.randn(*batch, n, p, generator=g, dtype=dtype)
    return nn.Parameter(X0.clone()), target


@pytest.mark.parametrize("cls,kw", [(optim.CayleyAdam, dict(lr=0.05)), (optim.CayleySGD, dict(lr=0.02))])
@pytest.mark.parametrize("granularity", ["stacked", "per_gate"])
def test_decreases_procrustes_objective_and_stays_feasible(cls, kw, granularity):
    H = 5
    p, target = _procrustes(4 * H, H)
    q, target_q = _procrustes(4 * H, H, seed=1)
    opt = cls([{"params": [p, q], "stiefel": True, "granularity": granularity}], **kw)
    loss0 = None
    for _ in range(150):
        opt.zero_grad()
        loss = (p - target).square().sum() + (q - target_q).square().sum()
        loss0 = loss.item() if loss0 is None else loss0
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * loss0
    for w in (p, q):
        blocks = w.detach().view(4, H, H) if granularity == "per_gate" else w.detach()
        assert stiefel.feasibility(blocks).max() < 1e-10
    if granularity == "stacked":
        # the optimum of ||X - T||^2 on St(n, p) is the polar factor of T
        opt_val = (stiefel.projx(target) - target).square().sum() + (stiefel.projx(target_q) - target_q).square().sum()
        assert loss.item() < opt_val.item() + 0.05 * (loss0 - opt_val.item())


def test_tall_weight_is_really_on_stiefel_not_plain_sgd():
    p, target = _procrustes(12, 3)
    opt = optim.CayleySGD([{"params": [p], "stiefel": True}], lr=0.1, momentum=0.0)
    x0 = p.detach().clone()
    (p - target).square().sum().backward()
    g = p.grad.clone()
    opt.step()
    plain = x0 - 0.1 * g
    assert not torch.allclose(p.detach(), plain, atol=1e-3)
    assert stiefel.feasibility(p.detach()).item() < 1e-12
    expected = stiefel.retr_cayley(x0, -0.1 * stiefel.proju(x0, g))
    assert torch.allclose(p.detach(), expected, atol=1e-12)


def test_float32_feasibility_over_10000_steps():
    H = 100
    torch.manual_seed(0)
    p = nn.Parameter(stiefel.projx(torch.randn(4 * H, H)).float())
    target = torch.randn(4 * H, H)
    opt = optim.CayleyAdam([{"params": [p], "stiefel": True}], lr=1e-3)
    worst = 0.0
    for step in range(10_000):
        opt.zero_grad(set_to_none=False)
        p.grad = 2 * (p.detach() - target) + 0.1 * torch.randn_like(p)
        opt.step()
        if step % 250 == 249:
            worst = max(worst, stiefel.feasibility(p.detach()).item())
    assert worst <= 1e-5
    assert opt.reprojections() >= 0 and isinstance(opt.reprojections(), int)


def test_reprojection_is_counted():
    p, target = _procrustes(8, 3)
    opt = optim.CayleyAdam([{"params": [p], "stiefel": True}], lr=0.01, check_every=1, feasibility_tol=1e-6)
    (p - target).square().sum().backward()
    opt.step()
    with torch.no_grad():
        p.add_(1e-3)  # knock it off the manifold
    opt.step()
    assert opt.reprojections() == 1
    assert stiefel.feasibility(p.detach()).item() < 1e-12


def test_off_manifold_start_is_projected_first():
    p = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    opt = optim.CayleySGD([{"params": [p], "stiefel": True}], lr=0.01)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert stiefel.feasibility(p.detach()).item() < 1e-12
    assert opt.reprojections() == 1


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_euclidean_groups_match_torch_adam(weight_decay):
    g = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3, generator=g))
    b = nn.Parameter(a.detach().clone())
    ours = optim.CayleyAdam([a], lr=1e-2, weight_decay=weight_decay)
    ref = torch.optim.Adam([b], lr=1e-2, weight_decay=weight_decay, foreach=False)
    for _ in range(20):
        grad = torch.randn(4, 3, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_lstm_updated_in_place_and_batched_across_weights(monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    names = [n for n in lstm._flat_weights_names if n.startswith("weight_hh")]
    with torch.no_grad():
        for n in names:
            getattr(lstm, n).copy_(stiefel.projx(getattr(lstm, n)))
    st = [getattr(lstm, n) for n in names]
    others = [p for n, p in lstm.named_parameters() if n not in names]
    ptrs = [p.data_ptr() for p in lstm.parameters()]
    calls = []
    orig = stiefel.retr_cayley
    monkeypatch.setattr(stiefel, "retr_cayley", lambda X, U, step=1.0: (calls.append(X.shape), orig(X, U, step))[1])
    opt = optim.CayleyAdam([{"params": st, "stiefel": True}, {"params": others}], lr=1e-2)
    x = torch.randn(5, 2, 3)
    for _ in range(3):
        opt.zero_grad()
        lstm(x)[0].square().sum().backward()
        opt.step()
    assert calls == [(4, 16, 4)] * 3  # one batched retraction for the four weights
    assert [p.data_ptr() for p in lstm.parameters()] == ptrs  # updated in place
    for w in st:
        assert stiefel.feasibility(w.detach()).item() < 1e-5


def test_bad_hyperparameters_raise():
    p = nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="n >= p"):
        optim.CayleyAdam([{"params": [p], "stiefel": True}])
    q = nn.Parameter(torch.randn(5, 3))
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got -1"):
        optim.CayleyAdam([q], lr=-1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        optim.CayleySGD([{"params": [q], "stiefel": True, "granularity": "cols"}])
    with pytest.raises(ValueError, match="momentum"):
        optim.CayleySGD([q], momentum=1.5)
