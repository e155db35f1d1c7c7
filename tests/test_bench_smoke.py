"""CPU smoke tests of the bench scripts (``--tiny``), so the benches cannot drift from the code they measure.

One function per bench script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_export_speed_tiny(tmp_path):
    """bench/export_speed.py --tiny: a real export (compensated Q4_K_M and Q8_0, verified) with every
    stage timed, H recorded and the peak memory read."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    proc = _bench("export_speed.py", "--tiny", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["variant"] == "tiny" and result["quant"] == ["q4_k_m", "q8_0"]
    for stage in ("reference_s", "importance_h_s", "compensation_s", "quantize_s", "verify_s"):
        assert result[stage] > 0, (stage, result)
    assert result["h_recorded"] == 14  # 2 layers x 7 projections, all at most 4096 wide
    assert result["compensated_tensors"]["Q4_K_M"] > 0 or result["kept"]["Q4_K_M"] == "plain"
    assert set(result["ppl"]) == {"Q4_K_M", "Q8_0"} and all(v > 1 for v in result["ppl"].values())
    assert "verification scores 2 held-out blocks (256 tokens)" in result["scored"]
    assert result["peak_rss_MB"] > 100
    assert "| tiny | cpu |" in proc.stdout
