"""End to end on one machine: ``rawtune run`` from model load to verified GGUFs, with the total and
each stage's share.

Builds a random-weight llama-architecture base of the asked shape (``bench/export_memory.py``'s
builder: bf16 safetensors, the tiny test tokenizer, SmolLM2's vocabulary size), writes a YAML config,
and runs the CLI in a fresh process exactly as a user does::

    rawtune run --config WORK/e2e.yaml

Stages: data (the repo's example corpus), train (the ``standard`` preset: r=128 rsLoRA on the seven
projections plus embed_tokens/lm_head, sequence 2048), eval, and export (compensated Q4_K_M and
Q8_0, each verified in llama.cpp). The total is the command's wall time, Python's imports included;
each stage's seconds come from ``run.json["stage_seconds"]``; "other" is the rest (imports, model
resolution, writing the run directory). Usage::

    python bench/end_to_end.py --size 1b --work /tmp/e2e --out $OUT    # the GPU machine
    python bench/end_to_end.py --tiny --work /tmp/e2e-tiny              # CPU smoke test

The 1b shape is Llama-3.2-1B's layers with SmolLM2's vocabulary (~1.2B parameters, ~2.5 GB of bf16
weights, ~8 GB of disk with the GGUFs). The random weights make training and quantization do the
real amount of work; their perplexities say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # its sibling benches: export_memory's builder, export_speed's breakdown
STAGES = ["data", "train", "eval", "export"]
SIZES = {
    # shape in export_memory.SHAPES: the config's keys beyond the preset
    "tiny": dict(seq_len=64, max_steps=4, batch_size=2, grad_accum=2, imatrix_blocks=4, max_documents=200),
    "135m": dict(max_steps=30, imatrix_blocks=16),
    "1b": dict(max_steps=30, imatrix_blocks=16),
}




def write_config(work: Path, size: str) -> Path:
    """The run's YAML config (flat keys, as ``examples/quickstart.yaml``)."""
    values = {"out": str(work / "run"), "stages": STAGES, "dataset": str(ROOT / "examples" / "python-docs.jsonl"),
              "model": str(work / "base"), "preset": "standard", "epochs": 10, "quant": ["q4_k_m", "q8_0"],
              "eval_steps": 0, "save_steps": 1000, **SIZES[size]}
    path = work / "e2e.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return path


def run(work: Path, size: str, out: Path | None, budget: float) -> dict:
    """Build the base once, run ``rawtune run`` in a fresh process; its total and per-stage seconds.

    Each line the run prints goes to the log with the seconds since the start, and run.json is copied
    beside the log however the run ends, so a run stopped at ``budget`` seconds still says where its
    time went (a GPU machine's call has a hard limit)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "model.safetensors").is_file():
        from export_memory import build

        build(work, size)
    config = write_config(work, size)
    log_path = (out or work) / f"end_to_end_{size}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "rawtune", "run", "--config", str(config)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    watchdog = threading.Timer(budget, proc.kill)
    watchdog.start()
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(f"{time.time() - started:7.1f}s {line}")
            log.flush()
    returncode = proc.wait()
    watchdog.cancel()
    total = time.time() - started
    record_path = work / "run" / "run.json"
    if record_path.is_file() and out:
        shutil.copy(record_path, out / f"end_to_end_{size}.run.json")
    if returncode != 0:
        why = f"stopped at the {budget:.0f} s budget" if total >= budget else f"exited {returncode}"
        raise SystemExit(f"rawtune run {why}; its log: {log_path}\n" + log_path.read_text()[-3000:])
    return summarize(json.loads(record_path.read_text()), size, total)


def summarize(record: dict, size: str, total: float) -> dict:
    """The result line: total, each stage's seconds and share, and what the run produced."""
    import torch
    from export_speed import breakdown

    stages = {stage: record["stage_seconds"][stage] for stage in STAGES}
    stages["other"] = round(max(total - sum(stages.values()), 0.0), 2)
    metrics = record.get("metrics") or {}
    return {
        "size": size, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "backend": record["train"].get("backend"), "steps": record["train"]["steps"],
        "train_tokens_per_s": metrics.get("train_tokens_per_s"),
        "total_s": round(total, 1), "stage_s": stages,
        "share_pct": {stage: round(100 * seconds / total, 1) for stage, seconds in stages.items()},
        "ppl_base": metrics.get("ppl_base"), "ppl_tuned": metrics.get("ppl_tuned"),
        "export": breakdown(record),
    }


def table(result: dict) -> str:
    rows = ["| stage | seconds | share |", "|---|---|---|"]
    rows += [f"| {stage} | {seconds} | {result['share_pct'][stage]} % |" for stage, seconds in result["stage_s"].items()]
    rows.append(f"| **total** | **{result['total_s']}** | 100 % |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="scratch folder (1b: ~8 GB of disk)")
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (smoke test)")
    parser.add_argument("--out", help="folder for the log, run.json and the result (e.g. $OUT)")
    parser.add_argument("--budget", type=float, default=3600.0,
                        help="stop the run after this many seconds (the log and run.json are kept)")
    args = parser.parse_args()
    size = "tiny" if args.tiny else args.size
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    result = run(Path(args.work), size, out, args.budget)
    if out:
        (out / f"end_to_end_{size}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
