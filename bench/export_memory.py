"""Peak memory and time of merge-and-convert: PEFT's whole-model fp32 merge against the streamed merge.

Builds a random-weight llama-architecture model in bf16 safetensors (tensor by tensor, so building
needs little RAM) with the tiny test tokenizer, and a random r=16 LoRA adapter in PEFT's format
with embed_tokens/lm_head in ``modules_to_save`` (the standard recipe's shape of adapter). Then
measures, each in a fresh Python process, the peak resident memory above that process's baseline
(``VmHWM`` minus ``VmRSS`` after the imports) and the wall time of:

- ``peft_merge``: PEFT's merge of the whole model in fp32 and saving the merged folder (what
  ``rawtune merge`` did before it streamed, ``rawtune.merge.merge_with_peft``);
- ``peft_convert``: today's GGUF writer (``rawtune.gguf_writer.convert``) on that merged folder;
- ``streamed_gguf``: ``rawtune.streamed.iter_merged_arrays`` feeding an F16 GGUF written tensor by
  tensor with the gguf package (tensor infos first, then each tensor's data as it is merged). The
  writer here carries the architecture numbers but not the tokenizer, which is small;
- ``streamed_folder``: ``rawtune.streamed.write_merged_folder`` (fp32, as ``rawtune merge`` writes);
- ``streamed_convert``: today's ``gguf_writer.convert`` given the merged config/tokenizer folder of
  ``streamed.for_gguf`` and, in place of its folder reader, the streamed arrays (the bench swaps
  ``gguf_writer.iter_hf_tensors`` in this process: the wiring an export would do); the writer still
  keeps every tensor until the end;
- ``streamed_convert_tempfile``: the same with ``gguf.GGUFWriter(use_temp_file=True)``, which
  spools each tensor to a temporary file as it is added.

Finally it checks that every tensor of the streamed GGUF equals, byte for byte, the one today's
path wrote. Usage::

    python bench/export_memory.py --size 135m --work /tmp/xm135
    python bench/export_memory.py --size 1b --work /tmp/xm1b
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


def stream_gguf(base: Path, adapter: Path, out: Path) -> int:
    """Write the merged model's tensors as an F16 GGUF, one tensor in memory at a time."""
    import gguf
    import numpy as np

    from rawtune import streamed
    from rawtune.export import gguf_writer

    config = json.loads((base / "config.json").read_text())
    n_layer, n_head, n_kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    ad = streamed.read_adapter(adapter)
    plan = streamed.merge_plan(base, ad)
    tied = plan.tied_after
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(n_layer)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    order = []
    for name, shape, _ in plan.names:
        if tied and name == "lm_head.weight":
            continue
        dtype = np.float32 if len(shape) == 1 else np.float16
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(names.get_name(name, try_suffixes=(".weight", ".bias")), shape, np.dtype(dtype), nbytes)
        order.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    count = 0
    for name, data in streamed.iter_merged_arrays(base, adapter):
        if name not in order:
            continue
        if name.endswith("q_proj.weight"):
            data = gguf_writer.permute_rope(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = gguf_writer.permute_rope(data, n_kv)
        writer.write_tensor_data(data.astype(np.float32 if data.ndim == 1 else np.float16))
        count += 1
    writer.close()
    return count


def _convert_from_stream(base: Path, adapter: Path, work: Path, temp_file: bool) -> None:
    """gguf_writer.convert on the streamed merge: its folder reader swapped for the stream (bench only)."""
    import functools

    import gguf

    from rawtune import streamed
    from rawtune.export import gguf_writer

    folder, arrays, _ = streamed.for_gguf((base, adapter), work / "skeleton")
    gguf_writer.iter_hf_tensors = lambda model_dir: arrays
    if temp_file:
        gguf.GGUFWriter = functools.partial(gguf.GGUFWriter, use_temp_file=True)
    out = work / ("streamed_tmp.f16.gguf" if temp_file else "streamed_conv.f16.gguf")
    gguf_writer.convert(folder, out, "f16", name="bench", log=lambda s: None)


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
    elif name == "streamed_gguf":
        stream_gguf(base, adapter, work / "streamed.f16.gguf")
    elif name == "streamed_folder":
        streamed.write_merged_folder((base, adapter), work / "streamed_merged", log=lambda s: None)
    elif name.startswith("streamed_convert"):
        _convert_from_stream(base, adapter, work, temp_file=name.endswith("tempfile"))
    seconds = time.time() - started
    peak = _rss_kib("VmHWM")
    print(json.dumps({"step": name, "seconds": round(seconds, 1), "baseline_MB": round(baseline / 1024),
                      "peak_over_baseline_MB": round((peak - baseline) / 1024)}))


def compare(work: Path) -> None:
    """Every tensor of the streamed GGUF equals today's path's, byte for byte."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(work / "peft.f16.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(work / "streamed.f16.gguf")).tensors}
    same = a.keys() == b.keys() and all(np.array_equal(a[n].data, b[n].data) for n in a)
    reference = (work / "peft.f16.gguf").read_bytes()
    whole = {f: (work / f).read_bytes() == reference for f in ("streamed_conv.f16.gguf", "streamed_tmp.f16.gguf")}
    print(json.dumps({"tensors": len(a), "identical": bool(same), "whole_file_identical": whole}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), required=True)
    parser.add_argument("--work", required=True, help="scratch folder (the 1b build needs ~15 GB)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.step:
        return compare(work) if args.step == "compare" else (build(work, args.size) if args.step == "build" else step(args.step, work))
    for name in ("build", "peft_merge", "peft_convert", "streamed_gguf", "streamed_folder", "streamed_convert",
                 "streamed_convert_tempfile", "compare"):
        subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(work), "--step", name], check=True)


if __name__ == "__main__":
    main()
