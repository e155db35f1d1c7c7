"""Export time per stage, side by side in one call: the quick start's compensated Q4_K_M and a 1B
export with compensated Q4_K_M and Q8_0, verified in llama.cpp.

Each variant builds a random-weight llama-architecture base in bf16 safetensors with a random r=16
LoRA adapter and a run directory around them (``bench/export_memory.py``'s builders: SmolLM2's
vocabulary size with the tiny test tokenizer), then runs ``rawtune.export.export_run`` in a fresh
process exactly as ``rawtune export DIR --quant ...`` does, and reports from run.json and the
process:

- ``reference``: loading the merged PyTorch model and its held-out perplexity pass;
- ``importance_h``: the layer-by-layer importance and H pass (on the GPU when there is one);
- ``compensation``: re-quantizing every k-quant tensor with the matrix and error compensation;
- ``quantize``: llama.cpp's own quantizer (``llama_model_quantize``) and the plain-vs-weighted check;
- ``verify``: every file loaded and scored in llama.cpp (in parallel), the blocks it says it scored;
- ``h_recorded`` (tensors with an H matrix), ``compensated_tensors``, ``peak_gpu_MB``
  (``torch.cuda.max_memory_allocated``) and ``peak_rss_MB`` (``VmHWM`` of the export process).

Variants: ``quickstart`` (SmolLM2-135M's shape, ``--quant q4_k_m``), ``1b`` (Llama-3.2-1B's shape,
``--quant q4_k_m,q8_0``), ``8b`` (Llama-3.1-8B's shape, ``--quant q4_k_m``: is H recorded, does
memory fit; needs ~45 GB of disk), ``tiny`` (2 layers, 256 wide: the CPU smoke test of this script,
``--tiny``). Usage::

    python bench/export_speed.py --work /tmp/xs                      # quickstart and 1b
    python bench/export_speed.py --work /tmp/xs --variants 8b --no-verify
    python bench/export_speed.py --tiny --work /tmp/xs-tiny          # CPU smoke test

llama.cpp on the GPU machine: it has no llama-cpp-python and no compiler, but the package is
ctypes over prebuilt shared libraries that do not depend on the Python version, so the CPU
machine's installed copy is carried in the device bundle and unpacked beside the other packages
(the command is in the script's ``--help`` epilog). Without it this script stops at once and says
so: without ggml nothing past the F16 file can be made, and 1B GGUFs are too large to bring back
for verification elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    # (shape in export_memory.SHAPES, --quant, train blocks, held-out blocks, seq_len)
    "tiny": ("tiny", ["q4_k_m", "q8_0"], 4, 2, 128),
    "quickstart": ("135m", ["q4_k_m"], 40, 16, 512),
    "1b": ("1b", ["q4_k_m", "q8_0"], 40, 16, 512),
    "8b": ("8b", ["q4_k_m"], 16, 4, 512),
}
EXTRA_SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # Llama-3.1-8B's layers with SmolLM2's vocabulary (the bench's tokenizer).
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}
CARRY_LLAMA_CPP = ("tar -C $(python -c 'import llama_cpp,os;print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))') "
                   "-cJf .device-bundle/llama_cpp.tar.xz llama_cpp diskcache   # on the CPU machine, once; then on the GPU "
                   "machine: tar -C /tmp/site -xJf .device-bundle/llama_cpp.tar.xz")


def _builders():
    """bench/export_memory.py as a module (its model, adapter and run-directory builders)."""
    spec = importlib.util.spec_from_file_location("export_memory", HERE / "export_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SHAPES.update(EXTRA_SHAPES)
    return module


def prepare(work: Path, variant: str) -> None:
    """Base, adapter and run directory of ``variant`` under ``work`` (the base is built once)."""
    shape, _, train, heldout, seq_len = VARIANTS[variant]
    builders = _builders()
    if not (work / "base" / "model.safetensors").is_file():
        builders.build(work, shape)
    builders.make_run(work, seq_len, train, heldout)


def _peak_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def export_step(work: Path, variant: str, imatrix_blocks: int, verify: bool = True) -> dict:
    """``export_run`` in this (fresh) process; the per-stage times, H, and peak memory."""
    import torch

    from rawtune.export import export_run
    from rawtune.export.steps import export_device
    from rawtune.rundir import RunDir
    from rawtune.settings import ExportSettings

    quant = VARIANTS[variant][1]
    lines: list[str] = []
    started = time.time()
    run = RunDir(work / "run")
    export_run(run, ExportSettings(quant=quant, imatrix_blocks=imatrix_blocks, verify=verify),
               log=lambda line: (lines.append(line), print(line, flush=True)))
    total = time.time() - started
    result = {
        "variant": variant, "quant": quant, "device": export_device().type,
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "params_M": round(_params(work) / 1e6),
        "total_s": round(total, 1),
        **breakdown(run.load()),
        "scored": next((line for line in lines if "verification scores" in line), None),
        "peak_gpu_MB": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "peak_rss_MB": _peak_rss_mb(),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def breakdown(record: dict) -> dict:
    """Export's seconds per stage and what it made, from a run's run.json (also used by end_to_end.py)."""
    export, gguf = record["export"], record["gguf"]
    compensation = sum(entry.get("seconds_requantize", 0.0) for entry in gguf.values())
    weighting = sum(entry.get("seconds_weighting", 0.0) for entry in gguf.values())
    quantize = sum(entry.get("seconds", 0.0) for label, entry in gguf.items() if label != "F16") - compensation
    return {
        "convert_s": export["seconds_convert"],
        "reference_s": round(export["seconds_reference_model"] + export.get("seconds_reference_ppl", 0.0)
                             + export.get("seconds_check_reference", 0.0), 1),
        "importance_h_s": export["seconds_imatrix"],
        "compensation_s": round(compensation, 1),
        "quantize_s": round(quantize, 1),
        "check_s": round(weighting - compensation, 1),
        "verify_s": round(export["seconds_verify"] - export.get("seconds_reference_ppl", 0.0), 1),
        "h_recorded": (export.get("imatrix") or {}).get("hessians", 0),
        "compensated_tensors": {label: entry.get("compensated_tensors", 0) for label, entry in gguf.items()},
        "kept": {label: (entry.get("imatrix_check") or {}).get("kept") for label, entry in gguf.items()},
        "ppl_merged": export["ppl_merged"],
        "ppl": {label: entry.get("ppl") for label, entry in gguf.items()},
        "kld_mean": {label: entry.get("kld_mean") for label, entry in gguf.items()},
    }


def _params(work: Path) -> int:
    import math

    from rawtune.streamed import merged_shapes

    return sum(math.prod(shape) for _, shape in merged_shapes((work / "base", work / "run" / "adapter")))


def run_variant(work: Path, variant: str, imatrix_blocks: int, out: Path | None, verify: bool = True) -> dict:
    """Prepare and export one variant, each in its own process; returns the export's result line."""
    vwork = work / variant
    vwork.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--work", str(vwork), "--variant", variant,
            "--imatrix-blocks", str(imatrix_blocks)]
    subprocess.run(base + ["--step", "prepare"], check=True)
    log_path = (out or vwork) / f"export_{variant}.log"
    proc = subprocess.run(base + ["--step", "export"] + ([] if verify else ["--no-verify"]), capture_output=True,
                          text=True)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: export failed (log: {log_path}):\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def table(results: list[dict]) -> str:
    cols = ["variant", "device", "total_s", "reference_s", "importance_h_s", "compensation_s", "quantize_s",
            "check_s", "verify_s", "h_recorded", "peak_gpu_MB", "peak_rss_MB"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in results]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=f"llama-cpp-python for the GPU machine: {CARRY_LLAMA_CPP}")
    parser.add_argument("--work", required=True, help="scratch folder (1b: ~6 GB of disk, 8b: ~45 GB)")
    parser.add_argument("--variants", default="quickstart,1b", help="comma-separated: quickstart, 1b, 8b, tiny")
    parser.add_argument("--tiny", action="store_true", help="the tiny variant on the CPU (smoke test)")
    parser.add_argument("--imatrix-blocks", type=int, default=16)
    parser.add_argument("--out", help="folder for the logs and results.json (e.g. $OUT)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip llama.cpp's check of the files (8b: is H recorded, does memory fit)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.step == "prepare":
        return prepare(work, args.variant)
    if args.step == "export":
        export_step(work, args.variant, args.imatrix_blocks, not args.no_verify)
        return
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit(f"llama-cpp-python is not importable: it quantizes and verifies. On the GPU machine: "
                         f"{CARRY_LLAMA_CPP}")
    variants = ["tiny"] if args.tiny else args.variants.split(",")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(work, v, 4 if v == "tiny" else args.imatrix_blocks, out, not args.no_verify)
               for v in variants]
    if out:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
