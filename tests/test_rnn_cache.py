"""The no-grad A(W) cache of the Stiefel modules: tries to make it hand out a stale value.

A hit must return exactly what recomputation gives (bitwise); any change of a raw weight,
however made, must be seen; autograd, tracing and transforms must bypass it.
"""

import copy
import pickle

import pytest
import torch
from rnn_reference import CELLS, perturb, reference_forward

from cdcore import rnn as cdrnn

pytestmark = pytest.mark.usefixtures("f64")

CELL_NAMES = list(CELLS)


@pytest.fixture
def calls(monkeypatch):
    """Counts evaluations of A(W) by the modules' forward (the flat path's, and the fallback's)."""
    count = {"n": 0}
    orig, orig_flat = cdrnn.dissolve_blocks, cdrnn.flat_dissolve

    def counted(*args):
        count["n"] += 1
        return orig(*args)

    def counted_flat(*args):
        count["n"] += args[5] is None if len(args) > 5 else 1  # a cache hit passes A(W) in
        return orig_flat(*args)

    monkeypatch.setattr(cdrnn, "dissolve_blocks", counted)
    monkeypatch.setattr(cdrnn, "flat_dissolve", counted_flat)
    return count


def _model(cell):
    m = CELLS[cell][0](3, 4, 2, bidirectional=True, penalty_param=0.5)
    perturb(m)
    return m


def _fresh(m, x):
    """The output recomputation gives: the same module's forward with the cache bypassed."""
    cache, m._no_grad_cache = m._no_grad_cache, cdrnn._NoGradCache()
    try:
        with torch.no_grad():
            return m(x)[0]
    finally:
        m._no_grad_cache = cache


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_a_hit_is_bitwise_what_recomputation_gives(cell, calls):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.no_grad():
        first = m(x)[0]
        again = m(x)[0]
    assert calls["n"] == 1  # the second forward hit
    assert torch.equal(again, first) and torch.equal(again, _fresh(m, x))
    m(x)  # with autograd: always computed
    assert calls["n"] == 3  # (+1 for _fresh)


def _adam_step(m, **kw):
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, **kw)
    m(torch.randn(5, 2, 3))[0].square().sum().backward()
    opt.step()


EDITS = {
    "fused_adam": lambda m: _adam_step(m, fused=True),
    "foreach_adam": lambda m: _adam_step(m, foreach=True),
    "data_in_place": lambda m: m.weight_hh_l1_reverse.data.add_(1e-3),
    "data_assigned": lambda m: setattr(m.weight_hh_l0, "data", m.weight_hh_l0.data * 1.01),
    "set_": lambda m: m.weight_hh_l0.set_(m.weight_hh_l0.detach() * 0.99),
    "copy_": lambda m: m.weight_hh_l1.copy_(m.weight_hh_l0),
    "one_ulp": lambda m: m.weight_hh_l0.view(-1)[3].copy_(
        torch.nextafter(m.weight_hh_l0.view(-1)[3], torch.tensor(10.0))
    ),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: (v * 0.9 if "hh" in k else v) for k, v in m.state_dict().items()}
    ),
    "dtype_round_trip": lambda m: m.float().double(),
    "granularity": lambda m: setattr(m, "granularity", "per_gate") if m.mode != "RNN_TANH" else None,
}


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("edit", list(EDITS))
def test_no_change_of_a_raw_weight_goes_unseen(cell, edit):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.no_grad():
        m(x)
        m(x)  # a hit: the cache holds a value
    if edit in ("fused_adam", "foreach_adam"):
        EDITS[edit](m)
    else:
        with torch.no_grad():
            EDITS[edit](m)
    with torch.no_grad():
        out = m(x)[0]
    assert torch.equal(out, _fresh(m, x))
    assert torch.allclose(out, reference_forward(m, x)[0], atol=1e-12)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_nan_weights_and_functional_call_under_no_grad(cell):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.no_grad():
        good = m(x)[0]
        saved = m.weight_hh_l0.detach().clone()
        m.weight_hh_l0[0, 0] = float("nan")
        assert m(x)[0].isnan().any()
        assert m(x)[0].isnan().any()  # NaN != NaN: bitwise keys still match, and the value is right
        m.weight_hh_l0.copy_(saved)
        assert torch.equal(m(x)[0], good)
        swapped = {"weight_hh_l1": torch.randn_like(m.weight_hh_l1)}
        out = torch.func.functional_call(m, swapped, (x,))[0]
        assert torch.allclose(out, reference_forward(m, x, params=swapped)[0], atol=1e-12)
        assert torch.equal(m(x)[0], good)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_inference_mode_in_both_directions(cell):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.inference_mode():
        a = m(x)[0]  # the cache now holds inference tensors
    with torch.no_grad():
        assert torch.equal(m(x)[0], a)
        m.weight_hh_l0.mul_(1.01)
    with torch.inference_mode():
        assert torch.equal(m(x)[0], _fresh(m, x))
    out, _ = m(x)  # an autograd forward after inference-mode forwards saves nothing stale
    out.sum().backward()
    assert m.weight_hh_l0.grad is not None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bypassed_by_autograd_tracing_and_transforms(cell, calls):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.no_grad():
        m(x)
        n = calls["n"]
        with pytest.warns(Warning):  # deprecation and tracer warnings
            traced = torch.jit.trace(m, (x,))
        assert calls["n"] > n  # the trace computed A(W): it is not a constant of the trace
        m.weight_hh_l0.mul_(1.01)
        assert torch.allclose(traced(x)[0], reference_forward(m, x)[0], atol=1e-12)
    seen = []

    def probe(w):
        seen.append(cdrnn._NoGradCache.applicable(torch.stack([w, w])))
        return w

    with torch.no_grad():
        torch.func.vmap(probe)(torch.randn(2, 3, 3))
        torch.func.grad(lambda w: (probe(w) ** 2).sum())(torch.randn(3, 3))
        assert cdrnn._NoGradCache.applicable(torch.randn(2, 3, 3))
        assert not cdrnn._NoGradCache.applicable(torch.randn(2, 3, 3, device="meta"))  # CPU only
    assert seen == [False, False]
    if cdrnn._OLD_DYNAMO:  # checked last, so that everything above runs on every torch
        pytest.skip("torch < 2.12: Dynamo fails (internal sympy error) compiling a no-grad forward here")
    with torch.no_grad():
        compiled = torch.compile(m, backend="aot_eager")
        compiled(x)
        m.weight_hh_l0.mul_(1.01)
        assert torch.allclose(compiled(x)[0], reference_forward(m, x)[0], atol=1e-12)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_copies_start_empty(cell):
    m, x = _model(cell), torch.randn(5, 2, 3)
    with torch.no_grad():
        m(x)
    assert m._no_grad_cache.value is not None
    assert copy.deepcopy(m)._no_grad_cache.value is None
    assert pickle.loads(pickle.dumps(m))._no_grad_cache.value is None
