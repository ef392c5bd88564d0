"""The README's library examples run on the real code (issue 14).

Every fenced block opened with ```python in README.md is extracted and executed, in
order, in one namespace (a later block may use what an earlier one defined).  The
examples train on a ``loader`` they do not define; the test provides one: two batches of
the reference notebook's shape (x: (64, 28, 28) rows of pixels in [0, 1], y: labels).
Shell blocks (```bash) are not executed here; the CLI has its own tests.
"""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of ``text``, in order."""
    return [m.group(1) for m in FENCE.finditer(text)]


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python \ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


def test_readme_python_examples_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's library examples are ```python blocks"
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(64, 28, 28, generator=g), torch.randint(10, (64,), generator=g)) for _ in range(2)]
    namespace = {"__name__": "readme", "loader": loader}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, namespace)
    # what the examples leave behind is usable: every nn.Module runs, every optimiser steps
    for name, obj in namespace.items():
        if isinstance(obj, nn.LSTM):
            out, _ = obj(loader[0][0][:2])
            assert torch.isfinite(out).all(), name
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            obj.step()
