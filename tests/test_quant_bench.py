"""bench/quant_kld.py --tiny: the benchmark behind docs/benchmarks.md's KL-divergence table runs end
to end on a tiny model, and its own scoring agrees with what export recorded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quant_kld.py"


def test_quant_kld_bench_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quant_kld", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--work", str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    rows = out["files"]
    assert set(rows) == {f"llama.cpp {q}" for q in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")} | {
        "llama.cpp IQ4_XS (generic matrix)"} | {f"rawtune {q}" for q in ("IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")}
    for name, row in rows.items():
        assert row["kld_mean"] >= 0 and 0 <= row["same_top_pct"] <= 100 and row["ppl"] > 1, name
    # The "rawtune" rows are export's own verification (its streamed merge as the reference); the
    # bench scores llama.cpp's files itself (PEFT's merge). Both scorers must agree on one file:
    # export's Q8_0, scored here again the bench's way.
    mine = _bench_score_of_export_file(bench, Path(out["run"]), "Q8_0", tmp_path)
    assert mine["kld_mean"] == pytest.approx(rows["rawtune Q8_0"]["kld_mean"], rel=0.02, abs=1e-6)
    assert mine["ppl"] == pytest.approx(rows["rawtune Q8_0"]["ppl"], rel=1e-4)
    if rows["rawtune Q8_0"]["kept"] == "plain":  # then it is llama.cpp's file, byte for byte
        assert rows["rawtune Q8_0"]["ppl"] == pytest.approx(rows["llama.cpp Q8_0"]["ppl"], rel=1e-4)
    assert out["ppl_merged"] == pytest.approx(out["export_ppl_merged"], rel=1e-4)
    assert any(line.startswith("[export] llama.cpp IQ4_XS: perplexity") for line in out["export_log"])
    assert rows["rawtune F16"]["kld_mean"] < rows["rawtune Q8_0"]["kld_mean"] < rows["rawtune Q4_K_M"]["kld_mean"]
    targets = out["targets"]
    assert targets["q4_k_m_ratio"] == pytest.approx(rows["rawtune Q4_K_M"]["kld_mean"] / rows["llama.cpp Q4_K_M"]["kld_mean"], rel=1e-2)
    printed = capsys.readouterr().out
    assert "| rawtune Q4_K_M |" in printed and "IQ4_XS KLD" in printed


def _bench_score_of_export_file(bench, run_path: Path, label: str, tmp_path: Path) -> dict:
    """The bench's scoring (its reference from PEFT's merge, its held-out blocks) of the file export wrote."""
    import numpy as np

    from rawtune.evaluate import scoring_blocks
    from rawtune.rundir import RunDir

    run = RunDir(run_path)
    held = scoring_blocks(np.load(run.data_dir / "heldout.npy"))
    again = tmp_path / "again"
    again.mkdir()
    _, store, _ = bench.reference(run, held, again)
    try:
        return bench.score(run.gguf_dir / run.load()["gguf"][label]["file"], held, store)
    finally:
        store.close()
