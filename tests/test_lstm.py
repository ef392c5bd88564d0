import copy
import io

import pytest
import torch
from torch import nn

import cdcore
from cdcore import dissolving, stiefel


pytestmark = pytest.mark.usefixtures("f64")


def _perturb_raw(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.dissolved_names:
            raw = model.parametrizations[name].original
            raw.add_(scale * torch.randn(raw.shape, generator=g))


CONFIGS = [(L, bi, bf) for L in (1, 2, 3) for bi in (False, True) for bf in (False, True)]


@pytest.mark.parametrize("num_layers,bidirectional,batch_first", CONFIGS)
def test_matches_cdopt_lstm(num_layers, bidirectional, batch_first):
    cdnn = pytest.importorskip("cdopt.nn")
    from cdopt.manifold_torch import stiefel_torch

    torch.manual_seed(0)
    I, H, T, N = 5, 6, 7, 3
    ours = cdcore.StiefelLSTM(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional,
                              penalty_param=0.5)
    ref = cdnn.LSTM_cdopt(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional,
                          manifold_class=stiefel_torch, penalty_param=0.5, dtype=torch.float64)
    _perturb_raw(ours)
    with torch.no_grad():
        for name in ours._flat_weights_names:
            getattr(ref, name).copy_(ours._leaf(name))
    x = torch.randn((N, T, I) if batch_first else (T, N, I))
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), N, H)
    c0 = torch.randn_like(h0)
    for hx in (None, (h0, c0)):
        out, (h, c) = ours(x, hx)
        out_r, (h_r, c_r) = ref(x, hx)
        assert torch.allclose(out, out_r, atol=1e-10, rtol=0)
        assert torch.allclose(h, h_r, atol=1e-10, rtol=0)
        assert torch.allclose(c, c_r, atol=1e-10, rtol=0)
    pen, pen_r = cdcore.quad_penalty(ours), cdnn.get_quad_penalty(ref)
    assert abs(pen.item() - pen_r.item()) < 1e-10
    assert pen.item() > 1e-3  # the raw weights really are off the manifold


def test_every_recurrent_weight_is_dissolved_and_gets_gradients():
    m = cdcore.StiefelLSTM(4, 3, num_layers=3, bidirectional=True, penalty_param=1.0)
    expected = {f"weight_hh_l{k}{s}" for k in range(3) for s in ("", "_reverse")}
    assert set(m.dissolved_names) == expected
    assert {n for n, *_ in cdcore.dissolved_weights(m)} == expected
    _perturb_raw(m)
    out, _ = m(torch.randn(5, 2, 4))
    (out.square().sum() + cdcore.quad_penalty(m)).backward()
    for name in expected:
        g = m.parametrizations[name].original.grad
        assert g is not None and g.abs().sum() > 0
    # each weight contributes to the penalty
    base = cdcore.quad_penalty(m).item()
    for name in expected:
        mm = copy.deepcopy(m)
        with torch.no_grad():
            mm.parametrizations[name].original.mul_(1.1)
        assert cdcore.quad_penalty(mm).item() > base


def test_forward_evaluates_the_map_once_and_never_the_parametrization(monkeypatch):
    m = cdcore.StiefelLSTM(4, 3, num_layers=2, bidirectional=True, penalty_param=1.0)
    calls = {"batched": 0, "param": 0}
    orig = dissolving.dissolve_with_penalty
    monkeypatch.setattr("cdcore.lstm.dissolve_with_penalty",
                        lambda X: (calls.__setitem__("batched", calls["batched"] + 1), orig(X))[1])
    fwd = dissolving.Dissolve.forward
    monkeypatch.setattr(dissolving.Dissolve, "forward",
                        lambda self, X: (calls.__setitem__("param", calls["param"] + 1), fwd(self, X))[1])
    out, _ = m(torch.randn(5, 2, 4))
    pen = cdcore.quad_penalty(m)  # reuses the forward's W^T W
    assert calls == {"batched": 1, "param": 0}
    (out.sum() + pen).backward()
    cdcore.quad_penalty(m)  # cached value is handed out once: recomputed now
    assert calls["batched"] == 2


def test_cached_penalty_equals_fresh_and_is_invalidated_by_updates():
    m = cdcore.StiefelLSTM(3, 4, num_layers=2, penalty_param=0.3)
    _perturb_raw(m)
    fresh = m.effective_weights()[1].item()
    m(torch.randn(2, 2, 3))
    assert cdcore.quad_penalty(m).item() == pytest.approx(fresh, rel=1e-12)
    m(torch.randn(2, 2, 3))
    with torch.no_grad():
        m.parametrizations.weight_hh_l0.original.mul_(1.2)
    assert cdcore.quad_penalty(m).item() > fresh  # stale cache not used
    with torch.no_grad():
        m(torch.randn(2, 2, 3))
    assert cdcore.quad_penalty(m).requires_grad  # no-grad forward's value not reused


def test_per_gate_granularity():
    m = cdcore.StiefelLSTM(3, 4, penalty_param=0.5, granularity="per_gate")
    raw = m.parametrizations.weight_hh_l0.original
    blocks = raw.view(4, 4, 4)
    assert stiefel.feasibility(blocks).max() < 1e-12  # each gate block orthogonal
    assert stiefel.feasibility(raw).item() > 1.0  # but not the stacked matrix
    _perturb_raw(m)
    expected = 0.5 * dissolving.quad_penalty_value(raw.view(4, 4, 4)).sum()
    assert torch.allclose(cdcore.quad_penalty(m), expected)


def test_parametrized_attribute_equals_forward_weights():
    for gran in ("stacked", "per_gate"):
        m = cdcore.StiefelLSTM(3, 4, num_layers=2, bidirectional=True, penalty_param=0.5, granularity=gran)
        _perturb_raw(m)
        x = torch.randn(6, 2, 3)
        ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        with torch.no_grad():
            for n in m._flat_weights_names:
                getattr(ref, n).copy_(getattr(m, n))  # the parametrisation's A(W)
        assert torch.allclose(m(x)[0], ref(x)[0], atol=1e-12)


def test_dtype_move_state_dict_and_deepcopy():
    m = cdcore.StiefelLSTM(3, 4, num_layers=2, bidirectional=True, penalty_param=0.5).float()
    assert all(t.dtype == torch.float32 for t in list(m.parameters()) + list(m.buffers()))
    assert all(w.dtype == torch.float32 for w in m._flat_weights)
    m = m.double()
    assert all(t.dtype == torch.float64 for t in list(m.parameters()) + list(m.buffers()))
    assert all(w.dtype == torch.float64 for w in m._flat_weights)
    if torch.cuda.is_available():
        mc = copy.deepcopy(m).to("cuda")
        assert all(t.is_cuda for t in mc.parameters())
    _perturb_raw(m)
    x = torch.randn(5, 2, 3)
    y = m(x)[0]  # a forward leaves no non-leaf tensors behind: deepcopy works
    twin = copy.deepcopy(m)
    assert torch.equal(twin(x)[0], y)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = cdcore.StiefelLSTM(3, 4, num_layers=2, bidirectional=True, penalty_param=0.5)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x)[0], y)
    assert "parametrizations.weight_hh_l1_reverse.original" in m.state_dict()


def test_to_lstm_exports_feasible_plain_lstm():
    m = cdcore.StiefelLSTM(3, 4, num_layers=2, bidirectional=True, penalty_param=0.5)
    x = torch.randn(5, 2, 3)
    plain = m.to_lstm()
    assert type(plain) is nn.LSTM
    assert torch.allclose(plain(x)[0], m(x)[0], atol=1e-12)  # on the manifold A = id
    _perturb_raw(m)
    plain = m.to_lstm()
    for n in m.dissolved_names:
        assert stiefel.feasibility(getattr(plain, n)).item() < 1e-12
    assert torch.equal(plain.weight_ih_l1, m.weight_ih_l1)


def test_zero_penalty_warns_and_bad_arguments_raise():
    with pytest.warns(UserWarning, match="nothing pulls it back"):
        cdcore.StiefelLSTM(3, 4, penalty_param=0.0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        cdcore.StiefelLSTM(3, 4, penalty_param=1.0, granularity="rows")
    with pytest.raises(ValueError, match="penalty_param"):
        cdcore.StiefelLSTM(3, 4, penalty_param=-1.0)


def test_unbatched_and_packed_inputs_work():
    m = cdcore.StiefelLSTM(3, 4, penalty_param=0.5)
    assert m(torch.randn(5, 3))[0].shape == (5, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    out, _ = m(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)


def test_from_lstm_copies_projects_and_keeps_the_random_stream():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    state = torch.random.get_rng_state()
    m = cdcore.StiefelLSTM.from_lstm(lstm, penalty_param=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(m.weight_ih_l1_reverse, lstm.weight_ih_l1_reverse)
    assert torch.allclose(m.parametrizations.weight_hh_l0.original, stiefel.projx(lstm.weight_hh_l0))


def test_no_grad_forwards_reuse_the_map_until_a_weight_changes(monkeypatch):
    m = cdcore.StiefelLSTM(4, 3, num_layers=2, bidirectional=True, penalty_param=1.0)
    calls = {"n": 0}
    orig = dissolving.dissolve_with_penalty
    monkeypatch.setattr("cdcore.lstm.dissolve_with_penalty",
                        lambda X: (calls.__setitem__("n", calls["n"] + 1), orig(X))[1])
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        first, _ = m(x)
        again, _ = m(x)
    assert calls["n"] == 1 and torch.equal(first, again)
    m(x)  # with autograd: always computed
    assert calls["n"] == 2
    raw = m.parametrizations.weight_hh_l1_reverse.original
    with torch.no_grad():
        raw.add_(0.01)  # in place, as an optimiser does: the cache is stale
        changed, _ = m(x)
    assert calls["n"] == 3 and not torch.allclose(changed, first)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict({k: (v * 0.5 if "weight_hh" in k else v) for k, v in state.items()})
    with torch.no_grad():
        loaded, _ = m(x)
    assert calls["n"] == 4
    other = torch.float32 if x.dtype == torch.float64 else torch.float64
    m.to(other)  # new tensors
    with torch.no_grad():
        converted, _ = m(x.to(other))
    assert calls["n"] == 5 and converted.dtype == other
    fresh = cdcore.StiefelLSTM(4, 3, num_layers=2, bidirectional=True, penalty_param=1.0).to(other)
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x.to(other))[0], converted)
