"""KL divergence of rawtune's GGUF files against llama.cpp's own, on one finished run.

For a run directory with held-out and training blocks and an adapter (``rawtune run --config ...
--stages data,train,eval``), this

1. exports it with ``rawtune export``'s own code (IQ4_XS, Q4_K_M, Q5_K_M, Q6_K, Q8_0 and F16: the
   importance matrix from the training text, error compensation, the keep/plain check), which
   records each file's KL divergence in run.json;
2. makes llama.cpp's default files from the same F16 GGUF: Q4_K_M, Q5_K_M, Q6_K and Q8_0 without a
   matrix, and IQ4_XS with a *generic* matrix: llama.cpp's statistic (the plain mean of x² per
   input column, forward passes only) over 16 blocks of an unrelated corpus (``--generic``);
3. scores llama.cpp's files with llama.cpp against the merged PyTorch model's logits on the run's
   held-out blocks (the tokens export reports), with :mod:`rawtune.export.kld`, next to what
   export recorded for its own files on the same tokens (Q8_0 is the cross-check: both files are
   llama.cpp's bytes, scored once by export and once here), and prints one markdown table plus the
   issue-23 targets: Q4_K_M mean KLD at most 0.5 x llama.cpp's default
   Q4_K_M's, Q8_0 under 0.002, IQ4_XS at most 0.6 x llama.cpp's IQ4_XS with the generic matrix.

Usage (CPU)::

    rawtune run --config examples/quickstart.yaml --out RUN --stages data,train,eval
    python bench/quant_kld.py RUN --generic OTHER.jsonl --work DIR [--json out.json]
    python bench/quant_kld.py --tiny --work DIR     # a tiny model built here; the test suite runs this

``--tiny`` builds a 384-wide llama with the test suite's tokenizer and sentences, trains it for a
few steps and measures the same way (the numbers mean nothing; the path is what is checked).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # imatrix_variants, also when this file is imported by path

ALL = ["iq4_xs", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"]
GENERIC_BLOCKS = 16


def tiny_run(work: Path) -> tuple[Path, Path]:
    """A trained tiny run and an unrelated corpus (other sentences), built with the test helpers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model, tiny_tokenizer, write_corpus

    from rawtune.pipeline import run_pipeline
    from rawtune.settings import RunSettings, apply

    tokenizer = tiny_tokenizer(work / "tokenizer")
    model = tiny_model(work / "model", tokenizer, "llama", hidden=384)
    corpus = write_corpus(work / "corpus.jsonl", documents=200)
    generic = write_corpus(work / "generic.jsonl", documents=60, seed=5)
    values = dict(out=str(work / "run"), dataset=str(corpus), model=str(model), preset="quick", seq_len=64,
                  batch_size=2, max_steps=12, learning_rate=3e-3, save_steps=12, train_embeddings=True,
                  stages=["data", "train", "eval"])
    run_pipeline(apply(RunSettings(), values), log=lambda line: None)
    return work / "run", generic


def generic_blocks(path: Path, tokenizer: Any, seq_len: int) -> np.ndarray:
    """``GENERIC_BLOCKS`` blocks of ``seq_len`` tokens of the unrelated corpus (JSONL ``text`` or plain text)."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line).get("text", "") if path.suffix == ".jsonl" else line
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
        if len(ids) >= 4 * GENERIC_BLOCKS * seq_len:
            break
    n = len(ids) // seq_len
    blocks = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    from rawtune.export.imatrix import pick_blocks

    return np.asarray(pick_blocks(blocks, GENERIC_BLOCKS), dtype=np.int64)


def plain_statistic(model: Any, model_dir: Path, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """llama.cpp's imatrix statistic: the mean of x² per input column of every block linear
    (bench/imatrix_variants.py's pass, in float32 as a matrix file holds it)."""
    from imatrix_variants import plain_statistic_of

    return {k: v.astype(np.float32) for k, v in plain_statistic_of(model, model_dir, blocks).items()}


def reference(run: Any, held: np.ndarray, work: Path) -> tuple[Any, Any, float]:
    """The merged model (fp32, CPU, PEFT's merge), its log-probabilities on ``held`` stored for KLD
    in ``work``, and its perplexity."""
    import torch

    from rawtune.export.kld import store_reference
    from rawtune.models import load_tuned

    model = load_tuned(run, device="cpu", dtype=torch.float32, merge=True)
    store, ppl = store_reference(model, held, work / "reference.npy", 4)
    return model, store, ppl


def score(path: Path, held: np.ndarray, store: Any) -> dict[str, Any]:
    from rawtune.export import kld, steps
    from rawtune.export.llama import load_llama

    scorer = kld.Scorer(store)
    llm = load_llama(path, n_ctx=int(held.shape[1]), logits_all=True)
    try:
        ppl = steps.llama_perplexity(llm, held, scorer)
    finally:
        llm.close()
    return {"bytes": path.stat().st_size, "ppl": round(ppl, 4), **scorer.summary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, nargs="?", help="a run directory with data/ and adapter/")
    p.add_argument("--generic", type=Path, help="an unrelated corpus (JSONL or text) for the generic IQ4_XS matrix")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="build and train a tiny model instead (smoke test)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quants", default=",".join(q for q in ALL if q != "f16"),
                   help="the types to compare (F16 is always made: llama.cpp's files are quantized from it)")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        a.run, a.generic = tiny_run(a.work)
    if a.run is None or a.generic is None:
        p.error("give RUN and --generic, or --tiny")
    labels = [q.strip().upper() for q in a.quants.split(",") if q.strip() and q.strip().lower() != "f16"]
    results = measure(a.run, a.generic, a.work, labels)
    text = table(results)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


def measure(run_path: Path, generic: Path, work: Path, labels: list[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rawtune.evaluate import scoring_blocks
    from rawtune.export import export_run, imatrix, steps
    from rawtune.models import base_and_adapter
    from rawtune.rundir import RunDir
    from rawtune.settings import ExportSettings

    run = RunDir(run_path)
    started = time.time()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    export_run(run, ExportSettings(quant=[q.lower() for q in labels] + ["f16"], imatrix_blocks=16, name="bench"),
               log=log)
    seconds_export = time.time() - started
    record = run.load()
    f16 = run.gguf_dir / record["gguf"]["F16"]["file"]
    held = scoring_blocks(np.load(run.data_dir / "heldout.npy"))
    base_dir, _ = base_and_adapter(run)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model, store, ppl_merged = reference(run, held, work)
    stat = plain_statistic(model, base_dir, generic_blocks(generic, tokenizer, int(held.shape[1])))
    del model
    gc.collect()
    files = {}
    for label in labels:
        out = work / f"llama.{label}.gguf"
        steps.quantize(f16, out, label, work / "quantize.log")
        if label == "IQ4_XS":  # llama.cpp's IQ4_XS is made with an importance matrix: here a generic one
            weighted = work / "llama.IQ4_XS.generic.gguf"
            imatrix.quantize_file(f16, out, weighted, imatrix.Imatrix(stat, GENERIC_BLOCKS, 0, "generic"), 2)
            out.unlink()
            out = weighted
        files[f"llama.cpp {label}" + (" (generic matrix)" if label == "IQ4_XS" else "")] = out
    rows = {name: score(path, held, store) for name, path in files.items()}
    store.close()
    for label in labels + ["F16"]:  # export's own verification of its files, on the same tokens
        entry = record["gguf"][label]
        rows[f"rawtune {label}"] = {key: entry.get(key) for key in ("bytes", "ppl", "kld_mean", "kld_p99",
                                                                   "same_top_pct", "kld_tokens")}
        rows[f"rawtune {label}"]["kept"] = (entry.get("imatrix_check") or {}).get("kept")
    return {"run": str(run_path), "generic": generic.name, "ppl_merged": round(ppl_merged, 4),
            "export_ppl_merged": record["export"]["ppl_merged"], "export_log": lines,
            "blocks": list(held.shape), "seconds_export": round(seconds_export, 1), "files": rows,
            "targets": targets(rows)}


def targets(rows: dict[str, dict]) -> dict[str, Any]:
    """Issue 23's three targets (those whose files were made)."""
    def k(name: str) -> float:
        return rows[name]["kld_mean"]

    out: dict[str, Any] = {}
    if "rawtune Q4_K_M" in rows:
        out["q4_k_m_ratio"] = round(k("rawtune Q4_K_M") / k("llama.cpp Q4_K_M"), 3)
        out["q4_k_m_met"] = out["q4_k_m_ratio"] <= 0.5
    if "rawtune Q8_0" in rows:
        out["q8_0_kld"], out["q8_0_met"] = k("rawtune Q8_0"), k("rawtune Q8_0") < 0.002
    if "rawtune IQ4_XS" in rows:
        out["iq4_xs_ratio"] = round(k("rawtune IQ4_XS") / k("llama.cpp IQ4_XS (generic matrix)"), 3)
        out["iq4_xs_met"] = out["iq4_xs_ratio"] <= 0.6
    return out


def table(results: dict[str, Any]) -> str:
    lines = [f"run {results['run']}: merged model perplexity {results['ppl_merged']:.4f} on "
             f"{results['blocks'][0]} x {results['blocks'][1]} held-out tokens; generic matrix from "
             f"{results['generic']}",
             "| file | size | perplexity | KLD mean | KLD 99th pct | same top token | kept |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["files"].items():
        lines.append(f"| {name} | {row['bytes'] / 1e6:.1f} MB | {row['ppl']:.4f} | {row['kld_mean']:.5f} | "
                     f"{row['kld_p99']:.4f} | {row['same_top_pct']:.2f} % | {row.get('kept') or ''} |")
    t = results["targets"]

    def met(key: str) -> str:
        return "met" if t[key] else "NOT met"

    said = []
    if "q4_k_m_ratio" in t:
        said.append(f"Q4_K_M KLD {t['q4_k_m_ratio']:.3f} x llama.cpp's default (target <= 0.5: {met('q4_k_m_met')})")
    if "q8_0_kld" in t:
        said.append(f"Q8_0 KLD {t['q8_0_kld']:.5f} (target < 0.002: {met('q8_0_met')})")
    if "iq4_xs_ratio" in t:
        said.append(f"IQ4_XS KLD {t['iq4_xs_ratio']:.3f} x llama.cpp's with a generic matrix "
                    f"(target <= 0.6: {met('iq4_xs_met')})")
    lines += ["", "; ".join(said)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
