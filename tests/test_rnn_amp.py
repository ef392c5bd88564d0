"""Mixed precision: the constraint arithmetic in float32 whatever autocast does (issue 11 item 3).

Where this platform's own ``nn`` module cannot run bf16 autocast (oneDNN has no bf16 LSTM
primitive on an AVX2-only CPU, or capped with ``ONEDNN_MAX_CPU_ISA=AVX2``), the bf16 tests of
that cell skip with the platform's reason, and the contract test checks that the Stiefel
module refuses as the plain one does (issue 21 item 2).
"""

import os
import platform
import subprocess
import sys

import pytest
import torch
from rnn_reference import CELLS, formula_penalty, perturb, reference_forward
from torch import nn

import cdcore
from cdcore.support import autocast_unsupported

CELL_NAMES = list(CELLS)
PLAIN = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def _skip_bf16_where_unsupported(cell):
    reason = autocast_unsupported(cell, "cpu", torch.bfloat16)
    if reason:
        pytest.skip(reason)


def _hidden(h):
    return list(h) if isinstance(h, tuple) else [h]


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bf16_autocast_forward_and_backward_on_cpu(cell):
    _skip_bf16_where_unsupported(cell)
    torch.manual_seed(0)
    m = CELLS[cell][0](3, 8, 2, batch_first=True, penalty_param=0.5)
    perturb(m, scale=0.1)
    x = torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hidden = m(x)
        loss = out.float().square().mean() + cdcore.quad_penalty(m)
        out_r, hidden_r, leaves = reference_forward(m, x)
        loss_r = out_r.float().square().mean() + formula_penalty(
            [leaves[n] for n in m.dissolved_names], "stacked", 0.5
        )
    assert out.dtype == out_r.dtype  # what nn gives under the same autocast (bf16 for LSTM and RNN)
    assert torch.allclose(out.float(), out_r.float(), atol=2e-2)
    for h, h_r in zip(_hidden(hidden), _hidden(hidden_r)):
        assert h.dtype == h_r.dtype and torch.allclose(h.float(), h_r.float(), atol=2e-2)
    assert loss.dtype == torch.float32
    loss.backward()
    loss_r.backward()
    for name, p in m.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all()
        scale = leaves[name].grad.abs().max().item()
        assert torch.allclose(p.grad, leaves[name].grad, atol=5e-2 * scale + 1e-6), name


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_no_grad_autocast_forward_then_plain_float32_forward(cell):
    _skip_bf16_where_unsupported(cell)
    m = CELLS[cell][0](3, 8, 2, penalty_param=0.5)
    perturb(m, scale=0.1)
    x = torch.randn(5, 2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    with torch.no_grad():
        out, hidden = m(x)  # nothing in bf16 left behind
    assert out.dtype == torch.float32
    out_r, hidden_r, _ = reference_forward(m, x)
    assert torch.allclose(out, out_r, atol=1e-5)
    out, _ = m(x)
    out.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


def _bf16_forward_backward(m, x):
    """None when a bf16 autocast forward and backward of ``m`` run, else the RuntimeError's text."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = m(x)
        out.float().square().mean().backward()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bf16_autocast_the_stiefel_module_runs_where_the_plain_module_runs(cell):
    """The contract on every CPU: both run, or both refuse with the platform's error."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    plain = _bf16_forward_backward(PLAIN[cell](3, 8, 2, batch_first=True), x)
    mine = _bf16_forward_backward(CELLS[cell][0](3, 8, 2, batch_first=True, penalty_param=0.5), x)
    assert mine == plain
    assert (plain is None) == (autocast_unsupported(cell, "cpu", torch.bfloat16) is None)


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="oneDNN's ISA cap is x86-64's")
def test_the_onednn_cap_is_honoured():
    """CI runs the fast tier once more with oneDNN capped to AVX2 (.ci/run) to see what an
    AVX2-only CPU sees; a torch build that ignored the cap would silently test the host's CPU
    instead.  In a fresh process (oneDNN reads its environment once): capped, this platform's
    nn.LSTM cannot run bf16 autocast and nn.GRU can."""
    code = (
        "import torch; from cdcore.support import autocast_unsupported as u; "
        "print(u('lstm') is not None, u('gru') is None)"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], f"cap ignored? {out.stdout}{out.stderr}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_fp16_autocast_with_grad_scaler_on_cuda(cell):
    torch.manual_seed(0)
    m = CELLS[cell][0](3, 16, 2, batch_first=True, bidirectional=True, penalty_param=0.5).cuda()
    perturb(m, scale=0.05)
    head = torch.nn.Linear(32, 4).cuda()
    opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)  # small enough not to skip the first steps
    x, y = torch.randn(8, 7, 3, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out, _ = m(x)
        out_r, _, _ = reference_forward(m, x)
    assert out.dtype == out_r.dtype == torch.float16
    assert torch.allclose(out.float(), out_r.float(), atol=1e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            out, _ = m(x)
            loss = torch.nn.functional.cross_entropy(head(out[:, -1]), y) + cdcore.quad_penalty(m)
        assert cdcore.quad_penalty(m).dtype == torch.float32
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float32 for p in m.parameters())
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(loss) and scaler.get_scale() > 0
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())
