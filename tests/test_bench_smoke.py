"""CPU smoke runs of the ``bench/`` scripts (``--tiny``), so a bench cannot drift from the code it measures.

One function per bench.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_bench_tiny_runs_bf16_twice_and_fp8_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "bench" / "fp8.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, env=env, cwd=ROOT, timeout=900)
    report = json.loads((tmp_path / "fp8.json").read_text())
    runs = report["runs"]
    assert [(r["fp8"], r["lora_seed"]) for r in runs] == [(False, 0), (False, 1), (True, 0)]
    steps = report["layout"]["steps"]
    for r in runs:
        assert len(r["losses"]) == steps and all(math.isfinite(x) and x > 0 for x in r["losses"])
        assert r["tokens_per_s"] > 0 and r["heldout_ppl"] > 1
    # the FP8 run quantized something (its losses are not bf16's) but stays close to them
    assert runs[2]["losses"] != runs[0]["losses"]
    (cmp,) = report["compare"]
    assert cmp["shape"] == "tiny-1b" and abs(cmp["heldout_ppl_diff_pct"]) < 5
