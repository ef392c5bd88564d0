import copy

import pytest
import torch
from torch import nn

from cdcore import optim, stiefel


def _procrustes(n, p, batch=(), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X0 = stiefel.random_point(n, p, *batch, generator=g, dtype=dtype)
    target = torch.randn(*batch, n, p, generator=g, dtype=dtype)
    return nn.Parameter(X0.clone()), target


@pytest.mark.parametrize(
    "cls,kw",
    [
        (optim.CayleyAdam, dict(lr=0.05)),
        (optim.CayleySGD, dict(lr=0.02)),
        (optim.CayleyRMSprop, dict(lr=0.01)),
    ],
)
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
        opt_val = (stiefel.projx(target) - target).square().sum() + (
            stiefel.projx(target_q) - target_q
        ).square().sum()
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


@pytest.mark.slow  # 10,000 optimiser steps on St(400, 100) in float32: about 35 s on a 2-core CPU
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


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_euclidean_groups_match_torch_rmsprop(weight_decay):
    g = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3, generator=g))
    b = nn.Parameter(a.detach().clone())
    ours = optim.CayleyRMSprop([a], lr=1e-2, alpha=0.9, weight_decay=weight_decay)
    ref = torch.optim.RMSprop([b], lr=1e-2, alpha=0.9, weight_decay=weight_decay, foreach=False)
    for _ in range(20):
        grad = torch.randn(4, 3, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_rmsprop_stiefel_steps_follow_the_formula():
    """Two steps written out: v = alpha v + (1 - alpha) mean(xi^2) per matrix, no bias correction,
    X <- R_X(-lr xi / (sqrt(v) + eps)), xi the tangent projection of the gradient."""
    p, target = _procrustes(12, 3, batch=(2,))
    lr, alpha, eps = 0.05, 0.9, 1e-8
    opt = optim.CayleyRMSprop([{"params": [p], "stiefel": True}], lr=lr, alpha=alpha, eps=eps)
    X, v = p.detach().clone(), torch.zeros(2, dtype=p.dtype)
    for _ in range(2):
        opt.zero_grad()
        (p - target).square().sum().backward()
        xi = stiefel.proju(X, p.grad)
        v = alpha * v + (1 - alpha) * xi.square().mean(dim=(-2, -1))
        X = stiefel.retr_cayley(X, -(lr / (v.sqrt() + eps))[:, None, None] * xi)
        opt.step()
        assert torch.allclose(p.detach(), X, atol=1e-12)
    assert stiefel.feasibility(X).max() < 1e-12


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
    monkeypatch.setattr(
        stiefel, "retr_cayley", lambda X, U, step=1.0: (calls.append(X.shape), orig(X, U, step))[1]
    )
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
    with pytest.raises(ValueError, match="lr must be a finite number >= 0; got -1"):
        optim.CayleyAdam([q], lr=-1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        optim.CayleySGD([{"params": [q], "stiefel": True, "granularity": "cols"}])
    with pytest.raises(ValueError, match="momentum"):
        optim.CayleySGD([q], momentum=1.5)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0 and < 1; got 1.0"):
        optim.CayleyRMSprop([q], alpha=1.0)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0; got 0"):
        optim.CayleyRMSprop([q], eps=0)


# -- torch.optim behaviour (issue 11 item 5) -----------------------------------------------------
def _stiefel_param(n=6, p=3, seed=0):
    return nn.Parameter(
        stiefel.random_point(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )


def test_lr_zero_is_allowed_and_moves_nothing():
    p, q = _stiefel_param(), nn.Parameter(torch.randn(4, dtype=torch.float64))
    before = p.detach().clone(), q.detach().clone()
    for cls in (optim.CayleyAdam, optim.CayleySGD):
        opt = cls([{"params": [p], "stiefel": True}, {"params": [q]}], lr=0)
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])


def test_each_stiefel_parameter_has_its_own_step_count():
    g = torch.Generator().manual_seed(1)
    p, q = _stiefel_param(seed=0), _stiefel_param(seed=1)
    q_alone = nn.Parameter(q.detach().clone())
    opt = optim.CayleyAdam([{"params": [p, q], "stiefel": True}], lr=0.05)
    for _ in range(3):  # q gets no gradient for three steps
        p.grad = torch.randn(6, 3, generator=g, dtype=torch.float64)
        opt.step()
    grad = torch.randn(6, 3, generator=g, dtype=torch.float64)
    p.grad, q.grad = torch.randn(6, 3, generator=g, dtype=torch.float64), grad.clone()
    opt.step()  # batched with p (step 4) but q's first step
    fresh = optim.CayleyAdam([{"params": [q_alone], "stiefel": True}], lr=0.05)
    q_alone.grad = grad.clone()
    fresh.step()
    assert torch.allclose(q, q_alone, atol=1e-13)
    assert opt.state[q]["step"] == 1 and opt.state[p]["step"] == 4


def test_non_finite_stiefel_gradient_raises_before_anything_changes():
    e = nn.Parameter(torch.randn(4, dtype=torch.float64))
    p, q = _stiefel_param(seed=0), _stiefel_param(seed=1)
    opt = optim.CayleyAdam([{"params": [e]}, {"params": [p, q], "stiefel": True}], lr=0.05)
    before = [t.detach().clone() for t in (e, p, q)]
    for bad in (float("nan"), float("inf")):
        e.grad, p.grad, q.grad = torch.ones_like(e), torch.ones_like(p), torch.ones_like(q)
        q.grad[2, 1] = bad
        with pytest.raises(
            ValueError,
            match=r"non-finite gradient .* Stiefel parameter 1 of param group 1, "
            r"shape \(6, 3\): no parameter was updated",
        ):
            opt.step()
        assert all(torch.equal(t, b) for t, b in zip((e, p, q), before))
        assert not opt.state  # nothing initialised either


def test_grad_scaler_skips_the_step_itself():
    lstm = nn.LSTM(3, 4)
    hh = [lstm.weight_hh_l0]
    rest = [p for n, p in lstm.named_parameters() if n != "weight_hh_l0"]
    opt = optim.CayleyAdam([{"params": hh, "stiefel": True}, {"params": rest}], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(5, 2, 3, dtype=torch.float32)
    lstm.float()
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    scaler.scale(lstm(x)[0].square().sum()).backward()
    lstm.weight_hh_l0.grad[0, 0] = float("inf")
    scaler.step(opt)  # finds the inf while unscaling and does not call opt.step
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert all(torch.equal(p, before[n]) for n, p in lstm.named_parameters())
    opt.zero_grad()
    scaler.scale(lstm(x)[0].square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(lstm.weight_hh_l0, before["weight_hh_l0"])
    assert stiefel.feasibility(lstm.weight_hh_l0.detach()).item() < 1e-5


def test_weight_decay_applies_to_euclidean_groups_only():
    p, e = _stiefel_param(), nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    p_ref, e_ref = nn.Parameter(p.detach().clone()), nn.Parameter(e.detach().clone())
    opt = optim.CayleyAdam([{"params": [p], "stiefel": True}, {"params": [e]}], lr=0.05, weight_decay=0.1)
    ref_st = optim.CayleyAdam([{"params": [p_ref], "stiefel": True}], lr=0.05)
    ref_eu = torch.optim.Adam([e_ref], lr=0.05, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        gp, ge = (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randn(4, 3, generator=g, dtype=torch.float64),
        )
        p.grad, p_ref.grad, e.grad, e_ref.grad = gp, gp.clone(), ge, ge.clone()
        opt.step(), ref_st.step(), ref_eu.step()
    assert torch.allclose(p, p_ref, atol=1e-13)  # the optimiser-wide decay does not touch the Stiefel group
    assert torch.allclose(e, e_ref, atol=1e-12)
    with pytest.raises(ValueError, match="param group 0: weight_decay must be 0 in a Stiefel group.*got 0.1"):
        optim.CayleySGD([{"params": [p], "stiefel": True, "weight_decay": 0.1}])
    optim.CayleySGD([{"params": [p], "stiefel": True, "weight_decay": 0.0}], weight_decay=0.1)


BAD_GROUPS = [
    (dict(lr=-1.0), "param group 1: lr must be a finite number >= 0; got -1.0"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (dict(check_every=0), "check_every must be an integer >= 1; got 0"),
    (dict(feasibility_tol=0.0), "feasibility_tol must be a finite number > 0"),
    (dict(stiefel="yes"), "stiefel must be True or False; got 'yes'"),
    (dict(stiefel=True, granularity="cols"), "granularity must be one of stacked, per_gate; got 'cols'"),
    (dict(stiefel=True, weight_decay=0.5), "weight_decay must be 0 in a Stiefel group"),
    (dict(stiefel=True, shape=(3, 5)), r"Stiefel parameter 0: .*needs n >= p"),
    (dict(stiefel=True, shape=(7, 3), granularity="per_gate"), r"Stiefel parameter 0: per_gate needs"),
    (dict(stiefel=True, shape=(2, 7, 3), granularity="per_gate"), r"Stiefel parameter 0: per_gate needs"),
    (dict(stiefel=True, shape=(5,)), r"Stiefel parameter 0: .*shape \(\.\.\., n, p\)"),
    (dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
    (dict(betas=0.9), r"betas must be two numbers"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
]


@pytest.mark.parametrize("bad,message", BAD_GROUPS)
def test_add_param_group_validates_like_the_constructor(bad, message):
    bad = dict(bad)
    shape = bad.pop("shape", (6, 3))
    w = nn.Parameter(torch.randn(*shape))
    first = nn.Parameter(torch.randn(2))
    group = {"params": [w], **bad}
    with pytest.raises(ValueError, match=message):
        optim.CayleyAdam([{"params": [first]}, dict(group)])
    opt = optim.CayleyAdam([first])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict(group))
    assert len(opt.param_groups) == 1  # the optimiser is left as it was
    if "momentum" not in bad and "betas" not in bad and "eps" not in bad:
        with pytest.raises(ValueError, match=message):
            optim.CayleySGD([{"params": [first]}, dict(group)])


def test_sgd_momentum_is_validated_per_group():
    first = nn.Parameter(torch.randn(2))
    with pytest.raises(
        ValueError, match=r"param group 1: momentum must be a finite number >= 0 and < 1; got 1.5"
    ):
        optim.CayleySGD([{"params": [first]}, {"params": [nn.Parameter(torch.randn(2))], "momentum": 1.5}])
    with pytest.raises(ValueError, match=r"momentum must be a finite number >= 0 and < 1; got 1.5"):
        optim.CayleySGD([first], momentum=1.5)


@pytest.mark.parametrize("cls", [optim.CayleyAdam, optim.CayleySGD, optim.CayleyRMSprop])
def test_batched_weight_with_per_gate_moves_each_block(cls):
    g = torch.Generator().manual_seed(3)
    blocks = stiefel.random_point(4, 4, 2, 3, generator=g, dtype=torch.float64)  # (2, 3, 4, 4)
    w = nn.Parameter(blocks.reshape(2, 12, 4).clone())  # a (2, 3H, H) weight, H = 4
    singles = [nn.Parameter(blocks[i].reshape(12, 4).clone()) for i in range(2)]
    opt = cls([{"params": [w], "stiefel": True, "granularity": "per_gate"}], lr=0.05)
    ref = cls([{"params": singles, "stiefel": True, "granularity": "per_gate"}], lr=0.05)
    for _ in range(3):
        grad = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
        w.grad = grad
        for i, s in enumerate(singles):
            s.grad = grad[i].clone()
        opt.step(), ref.step()
    assert torch.allclose(w, torch.stack(list(singles)), atol=1e-13)
    assert stiefel.feasibility(w.detach().reshape(6, 4, 4)).max() < 1e-12


@pytest.mark.parametrize("cls", [optim.CayleyAdam, optim.CayleySGD, optim.CayleyRMSprop])
def test_state_dict_round_trip_continues_identically(cls):
    g = torch.Generator().manual_seed(4)
    p, e = _stiefel_param(), nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = cls([{"params": [p], "stiefel": True}, {"params": [e]}], lr=0.05)
    grads = [
        (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.float64),
        )
        for _ in range(6)
    ]
    for gp, ge in grads[:3]:
        p.grad, e.grad = gp.clone(), ge.clone()
        opt.step()
    p2, e2 = nn.Parameter(p.detach().clone()), nn.Parameter(e.detach().clone())
    opt2 = cls([{"params": [p2], "stiefel": True}, {"params": [e2]}], lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for gp, ge in grads[3:]:
        p.grad, e.grad, p2.grad, e2.grad = gp.clone(), ge.clone(), gp.clone(), ge.clone()
        opt.step(), opt2.step()
    assert torch.equal(p, p2) and torch.equal(e, e2)
    assert opt2.state[p2]["step"] == 6


_HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}  # rounding of St(12, 4) at each dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [optim.CayleyAdam, optim.CayleySGD, optim.CayleyRMSprop])
def test_half_precision_weights_step_in_float32_and_keep_their_dtype(cls, dtype):
    """Issue 21 item 10: bf16 / fp16 weights used to raise in linalg.inv.  The arithmetic is
    float32, the weights and the optimiser state keep the parameter's dtype."""
    p64, target = _procrustes(12, 4, seed=3)
    p = nn.Parameter(p64.detach().to(dtype))
    opt = cls([{"params": [p], "stiefel": True}], lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        (p.float() - target.float()).square().sum().backward()
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert not torch.equal(p.detach(), p64.detach().to(dtype))
    assert stiefel.feasibility(p).item() < _HALF_TOL[dtype]
    st = opt.state[p]
    assert st["momentum"].dtype == dtype and st["second_moment"].dtype == dtype


@pytest.mark.parametrize("cls", [optim.CayleyAdam, optim.CayleySGD, optim.CayleyRMSprop])
def test_a_failing_step_leaves_parameters_and_state_untouched(cls, monkeypatch):
    """Compute first, write last: when the second bucket's update raises, the first
    parameter (another shape, already computed) and every state entry are as before."""
    p = _stiefel_param(seed=0)
    q = nn.Parameter(stiefel.random_point(8, 2, generator=torch.Generator().manual_seed(1)))
    opt = cls([{"params": [p, q], "stiefel": True}], lr=0.05)
    for first in (False, True):  # a failing step before any state exists, then after one
        if first:
            opt.zero_grad()
            (p.sum() + q.sum()).backward()
            opt.step()
        before = [t.detach().clone() for t in (p, q)]
        state = copy.deepcopy(opt.state_dict())
        real, calls = stiefel.retr_cayley, []

        def flaky(X, U, step=1.0):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real(X, U, step)

        monkeypatch.setattr(stiefel, "retr_cayley", flaky)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        with pytest.raises(RuntimeError, match="boom"):
            opt.step()
        monkeypatch.setattr(stiefel, "retr_cayley", real)
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])
        after = opt.state_dict()
        assert after["state"].keys() == state["state"].keys()
        for k, st in state["state"].items():
            for name, v in st.items():
                assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(v)), name


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


_SYNCING = {"_local_scalar_dense", "_linalg_check_errors", "nonzero", "item", "is_nonzero"}


def _count_step_ops(n_extra, monkeypatch):
    """Ops dispatched by one CayleyAdam step (after a warm-up step) of the notebook's model
    (2-layer bidirectional LSTM, hidden 100: 4 recurrent weights on St(400, 100)) plus
    ``n_extra`` more St(400, 100) weights, on the accelerator branch (no host checks)."""
    monkeypatch.setattr(optim._CayleyBase, "_host_checks", staticmethod(lambda opt: False), raising=False)
    torch.manual_seed(0)
    lstm = nn.LSTM(28, 100, num_layers=2, bidirectional=True)
    hh = [w for name, w in lstm.named_parameters() if "weight_hh" in name]
    extra = [nn.Parameter(stiefel.random_point(400, 100)) for _ in range(n_extra)]
    with torch.no_grad():
        for w in hh:
            w.copy_(stiefel.random_point(400, 100))
    others = [w for name, w in lstm.named_parameters() if "weight_hh" not in name]
    opt = optim.CayleyAdam(
        [{"params": hh + extra, "stiefel": True}, {"params": others}], lr=1e-3, check_every=10**6
    )
    counts = []
    for _ in range(2):
        for w in lstm.parameters():
            w.grad = torch.randn_like(w)
        for w in extra:
            w.grad = torch.randn_like(w)
        with _CountOps() as mode:
            opt.step()
        counts.append(mode.ops)
    return counts[-1]


def test_cayley_step_never_syncs_and_its_op_count_does_not_grow_with_weights(monkeypatch):
    """Issue 20 item 4: on the accelerator branch a Stiefel step dispatches no op that makes
    the host wait (.item()/bool(): _local_scalar_dense; linalg.inv's _linalg_check_errors),
    and the Stiefel weights of one shape share one batched update (4 vs 8 weights, same count)."""
    four = _count_step_ops(0, monkeypatch)
    eight = _count_step_ops(4, monkeypatch)
    assert not _SYNCING & set(four), sorted(_SYNCING & set(four))
    assert len(four) == len(eight), (len(four), len(eight))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cayley_steps_on_cuda_never_sync():
    lstm = nn.LSTM(28, 100, num_layers=2, bidirectional=True).cuda()
    hh = [w for name, w in lstm.named_parameters() if "weight_hh" in name]
    with torch.no_grad():
        for w in hh:
            w.copy_(stiefel.random_point(400, 100, device="cuda"))
    others = [w for name, w in lstm.named_parameters() if "weight_hh" not in name]
    opt = optim.CayleyAdam([{"params": hh, "stiefel": True}, {"params": others}], lr=1e-3, check_every=10**6)
    x = torch.randn(28, 8, 28, device="cuda")
    for i in range(4):
        opt.zero_grad()
        lstm(x)[0].square().mean().backward()
        if i:  # the first step initialises the state (one feasibility read per weight)
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert stiefel.feasibility(torch.stack(hh)).max() < 1e-4


def test_accelerator_branch_skips_a_non_finite_matrix_without_raising(monkeypatch):
    """Off the CPU a non-finite Stiefel gradient is not read on the host: that matrix and its
    moments stay as they were (torch.where), the others move."""
    monkeypatch.setattr(optim._CayleyBase, "_host_checks", staticmethod(lambda opt: False))
    p, q = _stiefel_param(seed=0), _stiefel_param(seed=1)
    opt = optim.CayleyAdam([{"params": [p, q], "stiefel": True}], lr=0.05)
    before = [t.detach().clone() for t in (p, q)]
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    q.grad[2, 1] = float("nan")
    opt.step()
    assert torch.equal(q, before[1]) and not torch.equal(p, before[0])
    assert torch.equal(opt.state[q]["momentum"], torch.zeros_like(q))
    assert opt.state[q]["second_moment"].item() == 0
