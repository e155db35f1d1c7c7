"""Peak memory and time of merge-and-convert: PEFT's whole-model fp32 merge against the streamed merge.

Builds a random-weight llama-architecture model in bf16 safetensors (tensor by tensor, so building
needs little RAM) with the tiny test tokenizer, and a random r=16 LoRA adapter in PEFT's format
with embed_tokens/lm_head in ``modules_to_save`` (the standard recipe's shape of adapter). Then
measures, each in a fresh Python process, the peak resident memory above that process's baseline
(``VmHWM`` minus ``VmRSS`` after the imports) and the wall time of:

- ``peft_merge``: PEFT's merge of the whole model in fp32 and saving the merged folder (what
  ``rawtune merge`` did before it streamed, ``rawtune.merge.merge_with_peft``);
- ``peft_convert``: today's GGUF writer (``rawtune.gguf_writer.convert``) on that merged folder;
- ``streamed_folder``: ``rawtune.streamed.write_merged_folder`` (fp32, as ``rawtune merge`` writes);
- ``streamed_convert``: ``gguf_writer.convert`` on the merged config/tokenizer folder of
  ``streamed.for_gguf`` with the streamed merge as its tensor source: what ``rawtune export``
  does for a safetensors base (tensor infos first, then each tensor's data as it is merged).

(Earlier versions of this bench also timed a hand-written streaming writer and the gguf writer
with a temporary file, before ``gguf_writer.convert`` streamed; docs/benchmarks.md keeps those
numbers.)

Finally it checks that the streamed GGUF equals, byte for byte, the one written from PEFT's
merged folder. Usage::

    python bench/export_memory.py --size 135m --work /tmp/xm135
    python bench/export_memory.py --size 1b --work /tmp/xm1b

``--export`` measures the real thing instead: a run directory is made around the same base and
adapter (``run.json``, ``adapter/``, training and held-out blocks of the test tokenizer's text),
then ``rawtune.export.export_run`` runs in a fresh process with Q4_K_M (importance matrix) and
Q8_0, exactly as ``rawtune export DIR --quant q4_k_m,q8_0`` does. Each line export logs is
printed with the seconds since the previous line and the peak resident memory over the
baseline in between (``VmHWM`` is reset after every line through ``/proc/self/clear_refs``), so
every step gets its own peak; the last line gives the whole export's peak. A last process loads
the F16 GGUF in llama.cpp and compares its logits on a short prompt with the merged model's in
PyTorch (fp32). The 1b run directory needs about 8 GB of disk::

    python bench/export_memory.py --size 1b --work /tmp/xe1b --export --imatrix-blocks 4 --heldout-blocks 2

On a CPU, ``--tiny`` runs either mode on a two-layer model with 64-token blocks (a smoke test of the
code, not a measurement)::

    python bench/export_memory.py --tiny
    python bench/export_memory.py --tiny --export
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # SmolLM2-135M's architecture.
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    # Llama-3.2-1B's architecture with SmolLM2's vocabulary (the shape of the GPU benchmark).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    # --tiny: the same code paths in seconds on a CPU (the smoke test in tests/test_bench_smoke.py).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- building the model and adapter


def build(work: Path, size: str) -> None:
    """Random bf16 base (written tensor by tensor) and a random r=16 adapter in PEFT's format."""
    import math

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import tiny_tokenizer

    from rawtune.streamed import _write_shard

    base, adapter = work / "base", work / "adapter"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(work / "tokenizer"))
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, dtype="bfloat16", **SHAPES[size])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = [(n, tuple(p.shape)) for n, p in model.state_dict().items() if n != "lm_head.weight"]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in specs:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            yield name, t.to(torch.bfloat16)

    base.mkdir(parents=True, exist_ok=True)
    _write_shard(base / "model.safetensors", specs, {n: "BF16" for n, _ in specs}, {n: 2 for n, _ in specs}, tensors())
    config.save_pretrained(base)
    tok.save_pretrained(base)
    _write_adapter(adapter, specs, base, gen)
    params = sum(math.prod(s) for _, s in specs)
    print(json.dumps({"built": size, "params": params, "base_bytes": (base / "model.safetensors").stat().st_size}))


def _write_adapter(adapter: Path, specs: list, base: Path, gen) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = 16
    out = {}
    for name, shape in specs:
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in PROJECTIONS:
            out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1], generator=gen) * 0.02
            out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r, generator=gen) * 0.01
        elif name == "model.embed_tokens.weight":
            emb = torch.randn(shape, generator=gen) * 0.02
            out["base_model.model.model.embed_tokens.weight"] = emb
            out["base_model.model.lm_head.weight"] = emb + torch.randn(shape, generator=gen) * 0.001
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(out, str(adapter / "adapter_model.safetensors"))
    LoraConfig(r=r, lora_alpha=32, target_modules=PROJECTIONS, task_type="CAUSAL_LM",
               modules_to_save=["embed_tokens", "lm_head"],
               base_model_name_or_path=str(base)).save_pretrained(str(adapter))


# ---------------------------------------------------------------- the measured steps


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def convert_streamed(base: Path, adapter: Path, skeleton: Path, out: Path, name: str) -> None:
    """gguf_writer.convert fed the streamed merge, as export does for a safetensors base."""
    from rawtune import streamed
    from rawtune.export import gguf_writer

    folder, arrays, _ = streamed.for_gguf((base, adapter), skeleton)
    source = gguf_writer.TensorSource(streamed.merged_shapes((base, adapter)), arrays)
    gguf_writer.convert(folder, out, "f16", name=name, log=lambda s: None, tensors=source)


def step(name: str, work: Path) -> None:
    """Run one measured step in this (fresh) process and print its JSON line."""
    import gguf  # noqa: F401  (imported before the baseline, like the others)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from rawtune import merge, streamed
    from rawtune.export import gguf_writer

    base, adapter = work / "base", work / "adapter"
    baseline = _rss_kib("VmRSS")
    started = time.time()
    if name == "peft_merge":
        merge.merge_with_peft((base, adapter), work / "peft_merged")
    elif name == "peft_convert":
        gguf_writer.convert(work / "peft_merged", work / "peft.f16.gguf", "f16", name="bench", log=lambda s: None)
    elif name == "streamed_folder":
        streamed.write_merged_folder((base, adapter), work / "streamed_merged", log=lambda s: None)
    elif name == "streamed_convert":
        convert_streamed(base, adapter, work / "skeleton", work / "streamed_conv.f16.gguf", "bench")
    seconds = time.time() - started
    peak = _rss_kib("VmHWM")
    print(json.dumps({"step": name, "seconds": round(seconds, 1), "baseline_MB": round(baseline / 1024),
                      "peak_over_baseline_MB": round((peak - baseline) / 1024)}))


def compare(work: Path) -> None:
    """The streamed GGUF equals the one written from PEFT's merged folder: every tensor, and the whole file."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(work / "peft.f16.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(work / "streamed_conv.f16.gguf")).tensors}
    same = a.keys() == b.keys() and all(np.array_equal(a[n].data, b[n].data) for n in a)
    whole = (work / "streamed_conv.f16.gguf").read_bytes() == (work / "peft.f16.gguf").read_bytes()
    print(json.dumps({"tensors": len(a), "identical": bool(same), "whole_file_identical": whole}))


# ---------------------------------------------------------------- the real export, measured


def make_run(work: Path, seq_len: int, train_blocks: int, heldout_blocks: int) -> None:
    """A run directory as training leaves it, around the built base and adapter."""
    import shutil

    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import sentences

    from rawtune.rundir import RunDir

    run = RunDir(work / "run")
    shutil.rmtree(run.path, ignore_errors=True)
    run.update(model={"spec": str(work / "base"), "local_dir": str(work / "base"), "upstream_id": None,
                      "source": "local", "license": "apache-2.0"},
               train={"backend": "bench", "steps": 0, "note": "random r=16 adapter built by the bench"})
    shutil.copytree(work / "adapter", run.adapter_dir)
    tok = AutoTokenizer.from_pretrained(work / "base")
    ids: list[int] = []
    for text in sentences(40 * (train_blocks + heldout_blocks) * seq_len // 64 + 100, seed=5):
        ids += tok.encode(text) + [tok.eos_token_id]
    blocks = np.asarray(ids[: (train_blocks + heldout_blocks) * seq_len], dtype=np.int32).reshape(-1, seq_len)
    run.data_dir.mkdir(parents=True, exist_ok=True)
    np.save(run.data_dir / "train.npy", blocks[:train_blocks])
    np.save(run.data_dir / "heldout.npy", blocks[train_blocks:])
    print(json.dumps({"run": str(run.path), "train_blocks": train_blocks, "heldout_blocks": heldout_blocks,
                      "seq_len": seq_len}))


class StepMeter:
    """Per log line: seconds since the previous line and the peak RSS over the baseline in between."""

    def __init__(self) -> None:
        self.baseline = _rss_kib("VmRSS")
        self.started = self.last = time.time()
        self.peak = 0
        self.steps: list[dict] = []
        self._reset()

    @staticmethod
    def _reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next peak is this step's own

    def __call__(self, line: str) -> None:
        now = time.time()
        peak = (_rss_kib("VmHWM") - self.baseline) // 1024
        self.peak = max(self.peak, peak)
        self.steps.append({"seconds": round(now - self.last, 1), "peak_over_baseline_MB": peak, "line": line[:150]})
        print(f"[bench] +{now - self.last:7.1f}s  peak {peak:6d} MB over baseline | {line}", flush=True)
        self.last = now
        self._reset()


def export_step(work: Path, imatrix_blocks: int) -> None:
    """``export_run`` on the bench's run directory, in this fresh process, measured per log line."""
    import gguf  # noqa: F401  (imported before the baseline: part of any process that exports)
    import llama_cpp  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from rawtune.export import export_run
    from rawtune.rundir import RunDir
    from rawtune.settings import ExportSettings

    meter = StepMeter()
    info = export_run(RunDir(work / "run"), ExportSettings(quant=["q4_k_m", "q8_0"], imatrix_blocks=imatrix_blocks),
                      log=meter)
    meter("(end of export_run)")
    base_bytes = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(json.dumps({"export_seconds": round(time.time() - meter.started, 1), "baseline_MB": meter.baseline // 1024,
                      "peak_over_baseline_MB": meter.peak, "base_bf16_MB": base_bytes // 2**20,
                      "ppl_merged": info["ppl_merged"], "ppl_f16": info["ppl_f16"],
                      "reference_dtype": info["reference_dtype"], "streamed": info["streamed"],
                      "merged_dir_exists": (work / "run" / "merged").exists()}))


def logits_step(work: Path) -> None:
    """The F16 GGUF's logits on a short prompt against the merged model's in PyTorch (fp32)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from rawtune import streamed
    from rawtune.export.llama import load_llama
    from rawtune.export.steps import llama_logits
    from rawtune.models import load_causal_lm

    run = work / "run"
    tok = AutoTokenizer.from_pretrained(work / "base")
    tokens = np.asarray(tok.encode("The river carries bright stones past old mills at dawn.")[:16], dtype=np.int64)
    f16 = next((run / "gguf").glob("*.F16.gguf"), None) or next((run / "gguf_work").glob("*.F16.gguf"), None)
    if f16 is None:  # export deletes its F16 work file: write one the same way for this check
        f16 = work / "check.F16.gguf"
        convert_streamed(work / "base", run / "adapter", work / "check-skeleton", f16, "check")
    llm = load_llama(f16, n_ctx=64, logits_all=True)
    try:
        got = llama_logits(llm, tokens)
    finally:
        llm.close()
    del llm
    model = load_causal_lm(work / "base", device="cpu", dtype=torch.float32)
    streamed.fill_merged(model, (work / "base", run / "adapter"))
    with torch.inference_mode():
        want = model(input_ids=torch.as_tensor(tokens[None, :])).logits[0].float().numpy()
    err = float(np.abs(got - want).max())
    print(json.dumps({"prompt_tokens": len(tokens), "max_abs_logit": round(float(np.abs(want).max()), 4),
                      "max_abs_diff": round(err, 5), "relative": round(err / float(np.abs(want).max()), 5),
                      "top1_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES))
    parser.add_argument("--work", help="scratch folder (the 1b build needs ~15 GB)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: --size tiny (a fresh --work by default)")
    parser.add_argument("--export", action="store_true", help="measure the real `rawtune export` on a run directory")
    parser.add_argument("--imatrix-blocks", type=int, default=16, help="--export: training blocks for the importance matrix")
    parser.add_argument("--heldout-blocks", type=int, default=16, help="--export: held-out blocks scored")
    parser.add_argument("--seq-len", type=int, default=512, help="--export: tokens per block")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        import tempfile

        args.size = "tiny"
        args.work = args.work or tempfile.mkdtemp(prefix="export_memory_tiny_")
        args.imatrix_blocks, args.heldout_blocks, args.seq_len = 2, 2, 64
    if not args.size or not args.work:
        parser.error("--size and --work are required (or --tiny)")
    work = Path(args.work)
    if args.step:
        return _one_step(args, work)
    names = ["build", "peft_merge", "peft_convert", "streamed_folder", "streamed_convert", "compare"]
    if args.export:
        names = (["build"] if not (work / "base" / "model.safetensors").is_file() else []) + ["run", "export", "logits"]
    for name in names:
        subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(work), "--step", name,
                        "--imatrix-blocks", str(args.imatrix_blocks), "--heldout-blocks", str(args.heldout_blocks),
                        "--seq-len", str(args.seq_len)], check=True)


def _one_step(args: argparse.Namespace, work: Path) -> None:
    if args.step == "compare":
        compare(work)
    elif args.step == "build":
        build(work, args.size)
    elif args.step == "run":
        make_run(work, args.seq_len, max(args.imatrix_blocks, 4), args.heldout_blocks)
    elif args.step == "export":
        export_step(work, args.imatrix_blocks)
    elif args.step == "logits":
        logits_step(work)
    else:
        step(args.step, work)


if __name__ == "__main__":
    main()
