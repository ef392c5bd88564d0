"""The prepared device calibration (scripts/cuda_calibration.py) runs its logic on a CPU."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cuda_calibration.py"


@pytest.mark.slow
def test_calibration_script_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert e.value.code == 0
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert result["weight_path"] == {"weight_path": "flat", "copy_warning": False}
    kernels = result["kernels"]
    assert set(kernels) == {"unconstrained", "cd", "cdopt"}
    assert kernels["cd"]["dispatched_kernel_ops"] - kernels["unconstrained"]["dispatched_kernel_ops"] <= 14
    assert "error" not in result["copy_path"]
