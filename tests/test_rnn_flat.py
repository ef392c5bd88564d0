"""Issue 20: the fused kernel receives every weight in place, as views of one flat buffer.

What the kernel is handed is recorded by wrapping ``torch._VF`` as nn's forward sees it; the
checks are those of cuDNN's ``try_get_weight_buf`` (one storage starting at element 0, the
layout's offsets, one dtype, contiguous).  Also: the stateless ``forward_with_penalty``, the
loud fallback, the autograd of the flat path (gradcheck, two forwards before one backward), the
no-grad path without host-device synchronisation, and (issue 21 item 8) ``to_plain`` /
``from_plain`` keeping the training / evaluation mode.  Each test failed before the change.
"""

import warnings

import pytest
import torch
from rnn_reference import CELL_GRANULARITIES, CELLS, formula_penalty, perturb, reference_forward
from torch import nn
from torch.nn.modules import rnn as nn_rnn
from torch.nn.utils import parametrize

import cdcore
from cdcore import rnn as cdrnn

pytestmark = pytest.mark.usefixtures("f64")

CELL_NAMES = list(CELLS)
KERNEL = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}


@pytest.fixture
def handed(monkeypatch):
    """The weight lists the fused kernels receive, call by call."""
    seen = []

    class VF:
        def __getattr__(self, name):
            real = getattr(torch._VF, name)

            def call(*args):
                seen.append(next(a for a in args if isinstance(a, list)))
                return real(*args)

            return call

    monkeypatch.setattr(nn_rnn, "_VF", VF())
    return seen


def _model(cell, granularity="stacked", **kw):
    m = CELLS[cell][0](3, 4, 2, bidirectional=True, penalty_param=0.5, granularity=granularity, **kw)
    perturb(m)
    return m


def assert_flat(weights, module):
    """What cuDNN's try_get_weight_buf requires, and the module's layout's offsets."""
    storage = weights[0].untyped_storage()
    layout = cdrnn._layout(module, [getattr(module, n) for n in module._flat_weights_names])
    assert isinstance(layout, cdrnn._Layout)
    for w, offset in zip(weights, layout.offsets):
        assert w.untyped_storage().data_ptr() == storage.data_ptr()
        assert w.storage_offset() == offset
        assert w.is_contiguous() and w.dtype == weights[0].dtype
    assert storage.nbytes() == layout.total * weights[0].element_size()


@pytest.mark.parametrize("cell,granularity", CELL_GRANULARITIES)
@pytest.mark.parametrize("grad", [True, False])
def test_the_kernel_gets_one_flat_buffer(cell, granularity, grad, handed):
    m, x = _model(cell, granularity), torch.randn(5, 2, 3)
    with torch.set_grad_enabled(grad):
        for _ in range(2):  # no grad: the second forward is a cache hit, still flat
            out, _ = m(x)
    assert len(handed) == 2
    for weights in handed:
        assert_flat(weights, m)
    assert handed[0][0].untyped_storage().data_ptr() != handed[1][0].untyped_storage().data_ptr()  # fresh
    assert torch.allclose(out, reference_forward(m, x)[0], atol=1e-12)
    assert m.weight_path == "flat"


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_forward_with_penalty_is_the_forward_and_quad_penalty(cell):
    m, x = _model(cell), torch.randn(5, 2, 3)
    out, hidden, penalty = m.forward_with_penalty(x)
    out2, hidden2 = m(x)
    assert torch.equal(out, out2)
    assert torch.allclose(penalty, cdcore.quad_penalty(m), rtol=1e-12, atol=0)
    (out.square().sum() + penalty).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (out2.square().sum() + cdcore.quad_penalty(m)).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12), n


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_forward_with_penalty_keeps_no_state(cell):
    # two calls, backward of the second first, then of the first: each has its own graph
    m, x = _model(cell), torch.randn(5, 2, 3)
    first = m.forward_with_penalty(x)
    with torch.no_grad():
        m.weight_hh_l0.mul_(1.01)  # a step between the calls
    second = m.forward_with_penalty(x)
    (second[0].sum() + second[2]).backward()
    g2 = m.weight_hh_l0.grad.clone()
    m.zero_grad()
    (first[0].sum() + first[2]).backward()  # the first graph is intact (its own buffer, its own C)
    assert not torch.allclose(g2, m.weight_hh_l0.grad)
    out_r, _, leaves = reference_forward(m, x)
    (out_r.sum() + formula_penalty([leaves[n] for n in m.dissolved_names], "stacked", 0.5)).backward()
    assert torch.allclose(g2, leaves["weight_hh_l0"].grad, atol=1e-10)
    assert not hasattr(m, "_penalty") and not any(isinstance(v, torch.Tensor) for v in vars(m).values())


@pytest.mark.parametrize("cell,granularity", CELL_GRANULARITIES)
def test_gradcheck_and_gradgradcheck_of_the_flat_function(cell, granularity):
    m = CELLS[cell][0](2, 3, 1, penalty_param=0.7, granularity=granularity)
    names = m._flat_weights_names
    weights = [getattr(m, n).detach().clone().requires_grad_() for n in names]
    layout = cdrnn._layout(m, weights)
    index = tuple(m._dissolved_index)

    def f(*ws):
        return cdrnn._FlatDissolve.apply(layout, index, granularity, 0.7, *ws)[: len(ws)] + (
            cdrnn._FlatDissolve.apply(layout, index, granularity, 0.7, *ws)[-1],
        )

    torch.manual_seed(0)
    with torch.no_grad():
        weights[1].add_(0.1 * torch.randn_like(weights[1]))
    assert torch.autograd.gradcheck(f, weights)
    assert torch.autograd.gradgradcheck(f, weights)


def test_two_forwards_before_one_backward():
    m, x = _model("lstm"), torch.randn(5, 2, 3)
    a, _ = m(x)
    b, _ = m(2 * x)
    (a.sum() + b.sum()).backward()
    out_a, _, la = reference_forward(m, x)
    out_b, _, lb = reference_forward(m, 2 * x, twin=None)
    (out_a.sum()).backward()
    (out_b.sum()).backward()
    for n in m._flat_weights_names:
        assert torch.allclose(getattr(m, n).grad, la[n].grad + lb[n].grad, atol=1e-10), n


class _Marked(torch.Tensor):
    """A tensor subclass (what a foreign library might hand the module)."""


class _AsSubclass(nn.Module):
    def forward(self, w):
        return w.as_subclass(_Marked)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_a_foreign_weight_falls_back_loudly_once(cell, handed):
    m, x = _model(cell), torch.randn(5, 2, 3)
    parametrize.register_parametrization(m, "weight_ih_l0", _AsSubclass())
    assert m.weight_path == "fallback: weight_ih_l0 is a tensor subclass (_Marked)"
    with pytest.warns(UserWarning, match="gets its weights apart.*tensor subclass") as record:
        out, _ = m(x)
        m(x)
    assert len(record) == 1 and record[0].filename == __file__
    assert torch.allclose(out.as_subclass(torch.Tensor), reference_forward(m, x)[0], atol=1e-12)
    assert handed[0][1].untyped_storage().data_ptr() != handed[0][0].untyped_storage().data_ptr()


def test_layouts_with_gaps_put_every_weight_at_its_offset():
    # cuDNN's layout, as a CUDA template reports it, may leave room between weights: emulated here
    m = _model("lstm")
    weights = [getattr(m, n) for n in m._flat_weights_names]
    offsets, at = [], 3
    for w in reversed(weights):  # another order than the kernel's, with gaps
        offsets.append(at)
        at += w.numel() + 2
    layout = cdrnn._Layout.from_offsets(list(reversed(offsets)), [w.shape for w in weights], at + 5)
    slots, penalty, _, _ = cdrnn.flat_dissolve(layout, weights, tuple(m._dissolved_index), "stacked", 0.5)
    effective, expected_penalty = m.effective_weights()
    assert slots[0].untyped_storage().nbytes() == layout.total * 8
    for name, w, slot, offset in zip(m._flat_weights_names, weights, slots, layout.offsets):
        assert slot.storage_offset() == offset
        want = effective[m.dissolved_names.index(name)] if name in m.dissolved_names else w
        assert torch.allclose(slot, want, atol=1e-14), name
    assert torch.allclose(penalty, expected_penalty, rtol=1e-12)
    with pytest.raises(ValueError, match="overlapping"):
        cdrnn._Layout.from_offsets([0, 1], [(2,), (2,)], 4)


SYNCING = {"aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::is_nonzero", "aten::item"}


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_the_no_grad_path_off_the_cpu_cache_never_reads_a_value_back(cell, monkeypatch):
    # on CUDA the cache is off (CPU only); nothing else may make the host wait for the device
    from torch.utils._python_dispatch import TorchDispatchMode

    m, x = _model(cell), torch.randn(5, 2, 3)
    monkeypatch.setattr(cdrnn._NoGradCache, "applicable", staticmethod(lambda stack: False))
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        m(x)  # the layout is cached by the first forward
        with Record():
            out, _ = m(x)
    assert ops and not set(ops) & SYNCING
    assert ops.count("aten::baddbmm") == 2  # one batched Gram matrix, one batched A


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_to_plain_and_from_plain_keep_the_mode(cell, training):
    m = CELLS[cell][0](3, 4, 2, dropout=0.5, penalty_param=0.5).train(training)
    assert m.to_plain().training is training
    assert getattr(m, f"to_{cell}")().training is training
    plain = CELLS[cell][1](3, 4, 2, dropout=0.5).train(training)
    assert CELLS[cell][0].from_plain(plain, penalty_param=0.5).training is training
    assert getattr(CELLS[cell][0], f"from_{cell}")(plain, penalty_param=0.5).training is training
    if not training:  # an exported evaluation-mode model runs without dropout: deterministic
        x = torch.randn(5, 2, 3)
        exported = m.to_plain()
        assert torch.equal(exported(x)[0], exported(x)[0])


def test_torch_compile_takes_the_flat_path():
    m, x = _model("lstm"), torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        out = torch.compile(m, backend="aot_eager")(x)[0]
    assert torch.allclose(out, reference_forward(m, x)[0], atol=1e-12)
