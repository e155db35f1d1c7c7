"""Q8_0 four ways, scored by KL divergence against the merged model (issue 23's Q8_0 target).

For one finished run (``rawtune run ... --stages data,train,eval``) this makes, from one F16 GGUF
of the merged model:

- ``plain``: llama.cpp's Q8_0;
- ``embd-f16``: llama.cpp's Q8_0 with ``token_embd`` and ``output`` kept in F16 (its quantize
  parameters ``token_embedding_type``/``output_tensor_type``), the largest single error source of a
  tied small model;
- ``compensated``: the plain file's block tensors re-rounded with error compensation (GPTQ-style,
  :func:`rawtune.export.imatrix.compensated`) from the H matrices of 16 training blocks, as export
  now does for Q8_0;
- ``compensated + embd-f16``: both.

Each file is scored in llama.cpp on the run's held-out blocks against the merged PyTorch model's
logits (:mod:`rawtune.export.kld`): size, perplexity, mean and 99th-percentile KLD, same top token.

Usage (CPU)::

    python bench/q8_variants.py RUN --work DIR [--json out.json]
    python bench/q8_variants.py --tiny --work DIR     # tests/test_bench_smoke.py runs this
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GGML_F16 = 1  # ggml_type of F16


def q8_with_f16_embeddings(f16: Path, dst: Path) -> None:
    """llama.cpp's Q8_0 with token_embd and output in F16 (llama.cpp's log to quantize.log beside it)."""
    from rawtune import quants
    from rawtune.export.llama import cpu_threads, llama_cpp, llama_log

    cpp = llama_cpp()
    params = cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = quants.get("Q8_0").ftype, cpu_threads()
    params.token_embedding_type = params.output_tensor_type = GGML_F16
    with llama_log(dst.parent / "quantize.log", f"llama_model_quantize {f16.name} -> {dst.name}"):
        rc = cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16.name}")


def measure(run_path: Path, work: Path) -> dict[str, Any]:
    from quant_kld import reference, score

    from rawtune.evaluate import scoring_blocks
    from rawtune.export import export_run, imatrix, steps
    from rawtune.models import base_and_adapter
    from rawtune.rundir import RunDir
    from rawtune.settings import ExportSettings

    run = RunDir(run_path)
    work.mkdir(parents=True, exist_ok=True)
    if "F16" not in (run.load().get("gguf") or {}):
        export_run(run, ExportSettings(quant=["f16"], name="q8v"), log=print)
    f16 = run.gguf_dir / run.load()["gguf"]["F16"]["file"]
    held = scoring_blocks(np.load(run.data_dir / "heldout.npy"))
    base_dir, _ = base_and_adapter(run)
    model, store, ppl_merged = reference(run, held, work)
    blocks = imatrix.pick_blocks(np.load(run.data_dir / "train.npy"), 16)
    matrix = imatrix.compute(base_dir, blocks, "training text", model=model)
    del model
    files = {"plain": work / "plain.Q8_0.gguf", "embd-f16": work / "embd-f16.Q8_0.gguf",
             "compensated": work / "compensated.Q8_0.gguf", "compensated + embd-f16": work / "both.Q8_0.gguf"}
    steps.quantize(f16, files["plain"], "Q8_0", work / "quantize.log")
    q8_with_f16_embeddings(f16, files["embd-f16"])
    threads = steps.cpu_threads()
    imatrix.quantize_file(f16, files["plain"], files["compensated"], matrix, threads)
    imatrix.quantize_file(f16, files["embd-f16"], files["compensated + embd-f16"], matrix, threads)
    rows = {name: score(path, held, store) for name, path in files.items()}
    store.close()
    return {"run": str(run_path), "ppl_merged": round(ppl_merged, 4), "blocks": list(held.shape), "files": rows}


def table(results: dict[str, Any]) -> str:
    plain = results["files"]["plain"]["kld_mean"]
    lines = [f"run {results['run']}: merged model perplexity {results['ppl_merged']:.4f} on "
             f"{results['blocks'][0]} x {results['blocks'][1]} held-out tokens",
             "| Q8_0 file | size | perplexity | KLD mean | vs plain | KLD 99th pct | same top token |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["files"].items():
        ratio = row["kld_mean"] / plain if plain else float("nan")
        lines.append(f"| {name} | {row['bytes'] / 1e6:.1f} MB | {row['ppl']:.4f} | {row['kld_mean']:.5f} | "
                     f"{ratio:.2f} x | {row['kld_p99']:.4f} | {row['same_top_pct']:.2f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, nargs="?", help="a run directory with data/ and adapter/")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="build and train a tiny model instead (smoke test)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        from quant_kld import tiny_run

        a.run, _ = tiny_run(a.work)
    if a.run is None:
        p.error("give RUN or --tiny")
    results = measure(a.run, a.work)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
