"""Every ``bench/`` script runs end to end on the CPU (``--tiny``), so the benches cannot drift from the library.

Each test starts one script in a subprocess exactly as a user would (``PYTHONPATH`` at the worktree,
a fresh ``--work`` folder), checks it exits 0 and that it printed its table with values in it.
One test function per script; the ones that start several training processes are marked ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, tmp_path: Path, timeout: int = 900) -> str:
    """Run ``bench/<script>`` with ``args``; return its stdout (fails with the output's tail on rc != 0)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OUT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    (tmp_path / "out").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_card_caps_8b_train(tmp_path):
    """The table that crashed on min() of no step events: every step now reports, so the timed
    window comes from step events (steps 2..3 of 1 warm-up and 2 timed steps)."""
    out = run_bench("card_caps.py", "--tiny", "--table", "8b-train", "--work", str(tmp_path / "w"),
                    "--budget", "800", tmp_path=tmp_path)
    assert "### 8B-class llama" in out
    m = re.search(r"train: losses \[([^\]]+)\] \(finite\), ([\d,]+) tok/s \(steps (\d+)\.\.(\d+)\)", out)
    assert m, out[-2000:]
    assert len(m.group(1).split(",")) == 3 and int(m.group(2).replace(",", "")) > 0
    assert int(m.group(4)) > int(m.group(3))  # at least two step events timed
    assert "[gpu]" not in out  # no CUDA: no plan line pretends there is a card


@pytest.mark.slow
def test_ddp_profile(tmp_path):
    out = run_bench("ddp_profile.py", "--tiny", "--work", str(tmp_path / "w"), "--budget", "800", tmp_path=tmp_path)
    rows = re.findall(r"^\| (\d) \| overlap \| ([\d.]+) \(", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out[-2000:]
    assert all(float(ms) > 0 for _, ms in rows)


@pytest.mark.slow
def test_export_memory(tmp_path):
    out = run_bench("export_memory.py", "--tiny", "--work", str(tmp_path / "w"), tmp_path=tmp_path)
    steps = re.findall(r'"step": "(\w+)", "seconds": [\d.]+, "baseline_MB": \d+, "peak_over_baseline_MB": \d+', out)
    assert steps == ["peft_merge", "peft_convert", "streamed_folder", "streamed_convert"], out[-2000:]
    assert '"identical": true, "whole_file_identical": true' in out


@pytest.mark.slow
def test_imatrix_variants(tmp_path):
    out = run_bench("imatrix_variants.py", "--tiny", "--work", str(tmp_path / "w"), tmp_path=tmp_path)
    table = out[out.rindex("| variant |"):]
    for label in ("llama.cpp default", "plain mean x², power 1", "grad mean x², power 1",
                  "compensated rounding (export's file)"):
        assert re.search(rf"^\| {re.escape(label)} \| [\d.]+ \| [+-][\d.]+ % \|", table, re.M), table


@pytest.mark.slow
def test_multi_gpu(tmp_path):
    out = run_bench("multi_gpu.py", "--tiny", "--work", str(tmp_path / "w"), tmp_path=tmp_path)
    assert "| run | command | micro x accum |" in out
    assert "failed, see the log" not in out, out[-3000:]
    assert re.search(r"largest loss difference per step, 1 GPU vs 2 GPUs", out), out[-2000:]


def test_train_speed(tmp_path):
    out = run_bench("train_speed.py", "speed", "--tiny", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                    "--steps", "2", "--warmup", "1", tmp_path=tmp_path)
    assert "skipped unsloth_seed" in out and "rawtune_16gib" in out  # CUDA-only variants are named as skipped
    rows = re.findall(r"^\| (peft_b16|rawtune) \| (\d+) x (\d+) \| \w+ \| ([\d,]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["peft_b16", "rawtune"], out[-2000:]
    assert all(int(m) * int(k) == 16 and int(tok.replace(",", "")) > 0 for _, m, k, tok in rows)


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


def test_end_to_end_tiny(tmp_path):
    """bench/end_to_end.py --tiny: the CLI's whole run (data, train, eval, verified export) in a fresh
    process; every stage is timed from run.json and the shares cover the total."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    printed = run_bench("end_to_end.py", "--tiny", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
                        tmp_path=tmp_path)
    result = json.loads((tmp_path / "out" / "end_to_end_tiny.json").read_text())
    assert result["steps"] == 4 and result["backend"] == "peft"
    assert list(result["stage_s"]) == ["data", "train", "eval", "export", "other"]
    assert all(result["stage_s"][stage] > 0 for stage in ("data", "train", "export"))
    assert sum(result["stage_s"].values()) == pytest.approx(result["total_s"], abs=0.2)
    assert result["export"]["h_recorded"] == 14 and set(result["export"]["ppl"]) == {"Q4_K_M", "Q8_0"}
    assert f"| **total** | **{result['total_s']}** | 100 % |" in printed


def test_changelog_corpus_writes_seed_jsonl(tmp_path):
    """The unseen corpus helper: N changelogs, each cut to the asked length, in the seed JSONL shape."""
    if len(list(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))) < 3:
        pytest.skip("this machine has fewer than 3 Debian changelogs")
    out = tmp_path / "c.jsonl"
    printed = run_bench("changelog_corpus.py", str(out), "--files", "3", "--max-chars", "100", tmp_path=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(0 < len(r["text"]) <= 100 and r["metadata"]["package"] for r in rows)
    assert printed.startswith("3 changelogs")


def test_q8_variants(tmp_path):
    """bench/q8_variants.py --tiny: four Q8_0 files scored against the merged model; the
    compensated file is the plain one's size, the F16-embedding ones are larger."""
    out = run_bench("q8_variants.py", "--tiny", "--work", str(tmp_path / "w"), tmp_path=tmp_path)
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^\| ([\w +-]+) \| ([\d.]+) MB \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert set(rows) == {"plain", "embd-f16", "compensated", "compensated + embd-f16"}, out[-2000:]
    assert rows["compensated"][0] == rows["plain"][0] < rows["embd-f16"][0] == rows["compensated + embd-f16"][0]
    assert all(math.isfinite(ppl) and ppl > 1 and kld >= 0 for _, ppl, kld in rows.values())


def test_device_calls_name_what_exists():
    """bench/device_calls.sh, the GPU machine's owed calls: it parses, every test file and bench
    script it names exists, and every ``-k`` selection picks at least one GPU test, so the plan
    cannot drift from the suite while it waits for a machine."""
    script = ROOT / "bench" / "device_calls.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    named = set(re.findall(r"\b((?:tests|bench)/[\w/]+\.py)\b", text))
    assert {"tests/test_app_gpu.py", "tests/test_family_train.py", "bench/export_speed.py"} <= named
    assert all((ROOT / path).is_file() for path in named), sorted(p for p in named if not (ROOT / p).is_file())
    for selection in re.findall(r'-k (?:"([^"]+)"|(\w+))', text):
        expression = selection[0] or selection[1]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                               "no:cacheprovider", "tests/test_family_train.py", "-k", expression],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        found = re.search(r"(\d+)(?:/\d+)? tests? collected|(\d+) selected", proc.stdout)
        assert proc.returncode == 0 and found, (expression, proc.stdout[-1500:])
        assert int(found.group(1) or found.group(2)) >= 1, (expression, proc.stdout[-500:])
