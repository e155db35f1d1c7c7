"""rawtune's default against Unsloth's best under a memory cap, and an 8B-class QLoRA run with streamed export.

Everything runs on one GPU in one invocation; every measured variant runs in its own Python process
(``import unsloth`` patches transformers for the whole process) and an out-of-memory error is a
result ("OOM"), not a crash. Models are random-weight architectures built on the machine with a
tokenizer trained there (a byte-level BPE padded to the model's vocabulary, with its own pad token,
which Unsloth needs).

Table A (``--table caps``): a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8 heads,
head_dim 64, intermediate 8192, vocab 49,152, tied embeddings, bf16), seq 2048, the ``standard``
preset (r=128 rsLoRA on 7 projections + embed_tokens/lm_head, effective batch 16), each process
held to the cap with ``torch.cuda.set_per_process_memory_fraction`` before anything is allocated,
and rawtune's planner told the cap through ``RAWTUNE_GPU_MEMORY_GIB``. Variants per cap:

- rawtune's default: ``rawtune.train.train`` on a run directory of random token blocks, 2 warm-up
  and 8 timed optimizer steps; tokens/s timed here from its per-step progress events (steps 3..10),
  rawtune's own reported figure shown beside it;
- with ``--fp8``, the same with FP8 frozen base weights (``RAWTUNE_FP8=1``; only rawtune's flattened
  model holds them, so the plan puts that loop first);
- Unsloth directly (``FastLanguageModel``, a bare loop: forward, backward, clip, fused AdamW, the
  same recipe) at micro-batch 16, 8, 4, 2 (x accumulation to 16), each with and without
  ``use_gradient_checkpointing="unsloth"``. "Unsloth's best" is the fastest that fit the cap.

Table B (``--table 8b``, or ``8b-train`` then ``8b-export`` in two back-to-back calls that share
``--work``): an 8B-class llama (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab
128,256, untied) written as bf16 safetensors shards tensor by tensor (random values drawn on the
GPU), trained 3 steps through ``rawtune.train.train`` with ``load_in_4bit=True`` and the Unsloth
backend under a 24 GiB cap; then the adapter goes through the streamed merge
(``rawtune.streamed.for_gguf``) into rawtune's GGUF writer (F16, the stream as its tensor source,
written tensor by tensor as ``rawtune export`` does) on the CPU,
with the peak RSS (VmHWM over the process's RSS after imports) and the time of that process. One
tensor of the GGUF is checked against ``W + scale * B @ A`` computed here. llama.cpp is not on the
GPU machine, so the GGUF is not loaded there. If the export call finds no trained adapter (a fresh
machine), it writes a random adapter of the same shape and says so.

The short tables go to stdout at the end (one line per variant as it finishes, too); every
process's full log goes to one file, ``card_caps_TABLE.log``, and the results to
``card_caps_TABLE.json``, in ``$OUT`` when it is set (else in ``--work``/logs).

Commands on the GPU machine (carry ``.device-bundle``; one call each, 10 minutes at most; Table A
takes one call per cap because 18 processes of imports, loads and compiles do not fit one call;
``--budget`` stops starting variants in time to print the table)::

    mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-bundle/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; python bench/card_caps.py --table caps --caps 24 --work /tmp/card_caps --budget 560
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-bundle/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; python bench/card_caps.py --table caps --caps 16 --work /tmp/card_caps --budget 560
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-bundle/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; python bench/card_caps.py --table 8b-train --work /tmp/card_caps --budget 560
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-bundle/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; python bench/card_caps.py --table 8b-export --work /tmp/card_caps --budget 560

On a bf16 card rawtune's row trains Unsloth's model in rawtune's fast loop
(:mod:`rawtune.train.model_loss`); with ``RAWTUNE_UNSLOTH_LOOP=trainer`` in the environment (the child
processes inherit it) it trains in the Trainer instead, as before 2026-11-28. The loss columns are not
comparable between rows: rawtune's row trains on fresh random blocks every step (its loss stays near
ln(vocab)), the bare Unsloth loop on the same 16 random blocks every step (it memorises them).

On a CPU, ``--tiny`` runs the same code paths on tiny shapes (no cap is enforced; without CUDA or
unsloth the Unsloth rows run the same bare loop on a PEFT model and are labelled as stand-ins;
4-bit loading needs CUDA, so the tiny 8B stand-in trains in 16 bits)::

    PYTHONPATH=$PWD python bench/card_caps.py --tiny --table caps
    PYTHONPATH=$PWD python bench/card_caps.py --tiny --table 8b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
EFFECTIVE = 16  # blocks per optimizer step (the standard preset's 2 x 8)
MICROS = (16, 8, 4, 2)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, max_position_embeddings=8192),
    # SmolLM2-135M's architecture (bench/multi_gpu.py).
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                 rope_theta=100000.0, max_position_embeddings=8192),
    # Stand-ins of the same kind (tied / untied) for --tiny on a CPU.
    "tiny-1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=True,
                    rope_theta=10000.0, max_position_embeddings=512),
    "tiny-8b": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=1536, tie_word_embeddings=False,
                    rope_theta=10000.0, max_position_embeddings=512),
}


# ================================================================ helpers used by the children


def rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def hold_to_cap(cap_gib: float) -> dict:
    """Cap this process's CUDA memory and tell rawtune's planner the card size; call before any allocation."""
    import torch

    if not torch.cuda.is_available():
        return {"cap_enforced": False}
    os.environ["RAWTUNE_GPU_MEMORY_GIB"] = str(cap_gib)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    return {"cap_enforced": True}


def peak_gib() -> float:
    """Peak CUDA memory allocated by this process, or its peak RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / GIB, 2)
    return round(rss_kib("VmHWM") / 2**20, 2)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ================================================================ building models


def build_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on generated text, padded with unused tokens to ``vocab_size``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import CHATML, train_bpe

    tok = train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    i = 0
    while len(vocab) < vocab_size:  # never produced by the merges, but give len(tokenizer) == vocab_size
        vocab.setdefault(f"<unused{i}>", len(vocab))
        i += 1
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def llama_config(shape: dict, tokenizer_dir: Path):
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlamaConfig(rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       dtype="bfloat16", **shape)


def build_small(path: Path, shape: dict) -> dict:
    """The 1B-class model: ``from_config`` + ``save_pretrained`` (as bench/train_speed.py does)."""
    import torch
    from transformers import AutoModelForCausalLM

    build_tokenizer(path, shape["vocab_size"])
    config = llama_config(shape, path)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising on the GPU is much faster
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return {"params": sum(p.numel() for p in model.parameters())}


def build_sharded(path: Path, shape: dict, shard_bytes: int = 4 * GIB) -> dict:
    """The 8B-class model as bf16 safetensors shards, written tensor by tensor (built on the meta device)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    build_tokenizer(path, shape["vocab_size"])
    config = llama_config(shape, path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shards, size = [[]], 0
    for name, shp in specs:
        nbytes = math.prod(shp) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in group:
            if len(shp) == 1:
                tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shp, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)
    return {"params": total // 2, "bytes": total, "shards": len(shards)}


def child_build(a) -> None:
    """Build the model into a.model_dir unless a finished build is there; time the build."""
    path = Path(a.model_dir)
    done = path / "built.json"
    info = {"card": card_info()}
    if done.is_file():
        info.update(json.loads(done.read_text()), reused=True)
        return emit(info)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    t0 = time.time()
    shape = SHAPES[a.shape]
    built = build_sharded(path, shape) if "8b" in a.shape else build_small(path, shape)
    built["build_s"] = round(time.time() - t0, 1)
    built["disk_GB"] = round(sum(f.stat().st_size for f in path.iterdir()) / 1e9, 2)
    done.write_text(json.dumps(built))
    emit({**info, **built, "reused": False})


def card_info() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU only, torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / GIB:.0f} GiB, torch {torch.__version__}"


# ================================================================ rawtune's default through train()


def random_run(run_path: Path, model_dir: Path, blocks: int, seq: int, vocab: int):
    """A run directory whose data stage holds random token blocks (train.npy, heldout.npy, run.json)."""
    import numpy as np

    from rawtune.rundir import RunDir

    run = RunDir(run_path)
    shutil.rmtree(run.path, ignore_errors=True)
    run.data_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(run.data_dir / "train.npy", rng.integers(0, vocab, (blocks, seq), dtype=np.int32))
    np.save(run.data_dir / "heldout.npy", rng.integers(0, vocab, (4, seq), dtype=np.int32))
    run.update(model={"spec": str(model_dir), "local_dir": str(model_dir), "upstream_id": None,
                      "source": "local", "license": None})
    return run


def child_rawtune(a) -> None:
    """rawtune's default: train() on random blocks; tokens/s timed from its per-step events."""
    cap = hold_to_cap(a.cap)
    from rawtune.settings import RunSettings, apply, validate
    from rawtune.train import train

    # logging_steps=1: a GPU reports every 10th step by default, and a 3-step run (8b-train) would
    # deliver no step event to time at all.
    values = dict(model=a.model_dir, preset="standard", seq_len=a.seq, eval_steps=0, save_steps=100000,
                  max_steps=a.steps + a.warmup, logging_steps=1)
    if a.four_bit:
        values.update(load_in_4bit=True, backend="unsloth")
    if a.fp8:  # as a user asks for it; the plan then puts the flattened loop (the one holding FP8) first
        os.environ["RAWTUNE_FP8"] = "1"
    if a.split:  # explicit settings are kept as given by the planner, embeddings included: freeze them
        micro, accum = (int(x) for x in a.split.split("x"))
        values.update(batch_size=micro, grad_accum=accum, gradient_checkpointing="unsloth", train_embeddings=False)
    settings = validate(apply(RunSettings(), values))
    vocab = json.loads((Path(a.model_dir) / "config.json").read_text())["vocab_size"]
    run = random_run(Path(a.run_dir), Path(a.model_dir), EFFECTIVE * (a.steps + a.warmup), a.seq, vocab)
    stamps: dict[int, float] = {}
    lines: list[str] = []

    def on_event(event: dict) -> None:
        if event.get("type") == "step":
            stamps[event["step"]] = time.time()

    def log(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    t0 = time.time()
    try:
        record = train(settings, run, callback=on_event, log=log)
    except Exception as exc:  # noqa: BLE001  (an OOM is a result; anything else is reported too)
        if not is_oom(exc):
            raise
        return emit({"status": "OOM", "peak_GiB": peak_gib(), **cap, "plan": plan_lines(lines)})
    eff = record.effective_settings
    steps = [e for e in record.history if e["type"] == "step"]
    tokens_per_step = eff["batch_size"] * eff["grad_accum"] * eff["seq_len"]
    # Every step reports (logging_steps=1), so the timed window runs from the end of the warm-up to
    # the last step; with fewer events than that, rawtune's own last figure is the measurement.
    first = a.warmup if a.warmup in stamps else min(stamps, default=0)
    last = max(stamps, default=0)
    tok_s = tokens_per_step * (last - first) / (stamps[last] - stamps[first]) if last > first else None
    if tok_s is None and steps:
        tok_s, first = steps[-1]["tokens_per_s"], 1
    emit({"status": "ok", "micro": eff["batch_size"], "accum": eff["grad_accum"],
          "gc": str(eff["gradient_checkpointing"]), "four_bit": bool(eff.get("load_in_4bit")),
          "train_embeddings": eff.get("train_embeddings"), "backend": record.backend,
          "tok_s": round(tok_s) if tok_s else None, "timed_steps": f"{first + 1}..{last}",
          "rawtune_tok_s": round(steps[-1]["tokens_per_s"]) if steps else None,
          "peak_GiB": peak_gib(), "loss": steps[-1]["loss"] if steps else None,
          "losses": [round(e["loss"], 4) for e in steps], "wall_s": round(time.time() - t0, 1),
          "adapter": str(run.adapter_dir), **cap, "plan": plan_lines(lines)})


def plan_lines(lines: list[str]) -> list[str]:
    return [s for s in lines if s.startswith(("[gpu]", "[train] backend", "[train] fast", "[train] Trainer",
                                              "[train] frozen base", "[train] RAWTUNE_FP8"))]


# ================================================================ Unsloth directly (bare loop)


def load_unsloth(model_dir: str, t: dict, seq: int, gc: bool):
    """Unsloth's loader and LoRA wrapper with the standard recipe (imported here: CUDA only)."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=seq, dtype=None,
                                                 load_in_4bit=False)
    return FastLanguageModel.get_peft_model(
        model, r=t["lora_r"], target_modules=PROJECTIONS + ["embed_tokens", "lm_head"], lora_alpha=t["lora_alpha"],
        lora_dropout=0.0, bias="none", use_rslora=t["use_rslora"], random_state=3407,
        use_gradient_checkpointing="unsloth" if gc else False, max_seq_length=seq)


def load_peft_standin(model_dir: str, t: dict, seq: int, gc: bool):
    """The same recipe on transformers + PEFT in fp32 (only for --tiny where Unsloth cannot run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=t["lora_r"], lora_alpha=t["lora_alpha"], lora_dropout=0.0, use_rslora=t["use_rslora"],
                        target_modules=PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def child_unsloth(a) -> None:
    """One Unsloth setting: micro-batch a.micro x accumulation to 16, checkpointing or not."""
    cap = hold_to_cap(a.cap)  # before `import unsloth`, which may allocate
    import torch

    cuda = torch.cuda.is_available()
    engine = "unsloth" if cuda and _has("unsloth") else "peft-standin"
    if cuda and engine != "unsloth":  # a stand-in only where Unsloth cannot run at all (--tiny on a CPU)
        return emit({"status": "unsloth not installed", **cap})
    if engine == "unsloth":
        import unsloth  # noqa: F401  (first, so its patches of transformers all apply)
    from rawtune.settings import PRESETS

    t = PRESETS["standard"]
    try:
        model = (load_unsloth if engine == "unsloth" else load_peft_standin)(a.model_dir, t, a.seq, a.gc)
        result = bare_loop(model, t, a, "cuda" if cuda else "cpu")
        if engine != "unsloth" and a.gc:
            result["gc"] = "on (transformers)"
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        return emit({"status": "OOM", "engine": engine, "peak_GiB": peak_gib(), **cap})
    emit({"status": "ok", "engine": engine, **result, **cap})


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def bare_loop(model, t: dict, a, device: str) -> dict:
    """Forward, backward, clip and fused AdamW over a.warmup + a.steps optimizer steps; time the last a.steps."""
    import torch
    from train_speed import bare_step  # the same bare loop as the speed bench (bench/ is on the path)

    model.train()
    lora, embed = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (embed if ("embed_tokens" in name or "lm_head" in name) else lora).append(p)
    groups = [{"params": lora, "lr": t["learning_rate"], "weight_decay": 0.0}]
    if embed:
        groups.append({"params": embed, "lr": t["embedding_learning_rate"], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, fused=device == "cuda")
    params = lora + embed
    vocab = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, vocab, (EFFECTIVE, a.seq), device=device, generator=g)
    accum = EFFECTIVE // a.micro
    step = bare_step(model, opt, params, data, a.micro)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.time()
    loss = None
    for _ in range(a.steps):
        loss = step()
    sync()
    elapsed = time.time() - t0
    return {"micro": a.micro, "accum": accum, "gc": "unsloth" if a.gc else "off",
            "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2),
            "tok_s": round(a.steps * EFFECTIVE * a.seq / elapsed), "peak_GiB": peak_gib(),
            "loss": round(float(loss), 4)}


# ================================================================ streamed export of the 8B adapter


def write_random_adapter(adapter_dir: Path, model_dir: Path) -> None:
    """A PEFT-format r=128 rsLoRA adapter on the 7 projections (when training left none behind)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from rawtune.streamed import TensorFile, base_files

    gen = torch.Generator().manual_seed(0)
    r, out = 128, {}
    for f in base_files(model_dir):
        tf = TensorFile(f)
        for name in tf.names():
            module = name.rsplit(".", 1)[0]
            if module.rsplit(".", 1)[-1] in PROJECTIONS and name.endswith(".weight"):
                rows, cols = tf.shape(name)
                out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, cols, generator=gen) * 0.01
                out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * 0.001
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(adapter_dir / "adapter_model.safetensors"))
    LoraConfig(r=r, lora_alpha=64, use_rslora=True, target_modules=PROJECTIONS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(str(adapter_dir))


def child_export(a) -> None:
    """Streamed merge into rawtune's GGUF writer (F16); peak RSS over the post-import baseline and time."""
    import gguf  # noqa: F401  (imported before the baseline, as the writer would import it)
    import numpy as np
    import peft  # noqa: F401  (imported before the baseline, as a real export process would have)
    import torch  # noqa: F401

    from rawtune import streamed
    from rawtune.export import gguf_writer

    model_dir, adapter_dir, out = Path(a.model_dir), Path(a.adapter_dir), Path(a.gguf)
    base_bytes = sum(f.stat().st_size for f in streamed.base_files(model_dir))
    free = shutil.disk_usage(out.parent).free
    baseline = rss_kib("VmRSS")
    t0 = time.time()
    folder, arrays, info = streamed.for_gguf((model_dir, adapter_dir), out.parent / "skeleton")
    n_total = len(streamed.merge_plan(model_dir, streamed.read_adapter(adapter_dir)).names)

    def progress(items):
        for i, item in enumerate(items, 1):
            if i % 25 == 0 or i == n_total:
                print(f"PROGRESS tensor {i}/{n_total} {time.time() - t0:.0f}s VmHWM {rss_kib('VmHWM') / 2**20:.2f} GiB",
                      flush=True)
            yield item

    source = gguf_writer.TensorSource(streamed.merged_shapes((model_dir, adapter_dir)), progress(arrays))
    report = gguf_writer.convert(folder, out, "f16", name="card-caps-8b", log=lambda s: print(s, flush=True),
                                 tensors=source)
    seconds = time.time() - t0
    peak = rss_kib("VmHWM")
    check = check_one_tensor(out, model_dir, adapter_dir, np)
    size = out.stat().st_size
    out.unlink()  # ~16 GB: leave the disk to the next call
    emit({"status": "ok", "seconds": round(seconds, 1), "baseline_GiB": round(baseline / 2**20, 2),
          "peak_over_baseline_GiB": round((peak - baseline) / 2**20, 2), "vmhwm_GiB": round(peak / 2**20, 2),
          "gguf_GB": round(size / 1e9, 2), "base_GB": round(base_bytes / 1e9, 2), "tensors": report["tensors"],
          "free_disk_GB": round(free / 1e9, 1), "untied": info.get("untied_embeddings"),
          "check": check})


def check_one_tensor(gguf_path: Path, model_dir: Path, adapter_dir: Path, np) -> str:
    """blk.0.ffn_down in the GGUF equals f16(W + scale * B @ A) computed from the files (no RoPE permutation there)."""
    import gguf
    import torch

    from rawtune import streamed

    name = "model.layers.0.mlp.down_proj.weight"
    adapter = streamed.read_adapter(adapter_dir)
    base = next(streamed.TensorFile(f) for f in streamed.base_files(model_dir) if name in streamed.TensorFile(f).entries)
    w = base.read(name).to(torch.float32)
    if name in adapter.lora:
        a_key, b_key = adapter.lora[name]
        w += (adapter.file.read(b_key).to(torch.float32) @ adapter.file.read(a_key).to(torch.float32)) * adapter.scale
    want = w.numpy().astype(np.float16)
    reader = gguf.GGUFReader(str(gguf_path))
    got = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    data = np.asarray(got.data).reshape(want.shape)
    same = bool(np.array_equal(data.view(np.uint16), want.view(np.uint16)))
    finite = bool(np.isfinite(data.astype(np.float32)).all())
    adapted = name in adapter.lora
    return (f"blk.0.ffn_down {'equals' if same else 'DIFFERS FROM'} f16(W + scale*B@A) "
            f"({'adapter applied' if adapted else 'NO adapter for it'}), finite={finite}, "
            f"{len(reader.tensors)} tensors in the file")


# ================================================================ the parent: spawning and tables


class Runner:
    """Spawns one child per variant with a shared deadline; logs and results under the output folder."""

    def __init__(self, a, out: Path, logs: Path):
        self.a, self.out, self.logs = a, out, logs
        self.deadline = time.time() + a.budget
        self.results: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def spawn(self, tag: str, args: list[str], need_s: float, limit_s: float) -> dict:
        """Run ``card_caps.py child ...`` in a fresh process; its RESULT line is the result."""
        if self.left() < need_s:
            return self.record(tag, {"status": "skipped (time budget)"})
        timeout = max(5.0, min(limit_s, self.left() - 5))
        log = self.logs / f"{tag}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", *args, *self.common()]
        t0 = time.time()
        with log.open("w") as handle:
            handle.write(" ".join(cmd) + "\n")
            handle.flush()
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=self.a.work,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its compile workers too
                proc.wait()
                rc = "timeout"
        text = log.read_text(errors="replace")
        result = parse(text)
        if result is None:
            tail = [s for s in text.strip().splitlines() if s.strip()][-1:] or [""]
            progress = [s for s in text.splitlines() if s.startswith("PROGRESS ")][-1:]
            result = {"status": f"timeout after {timeout:.0f}s" if rc == "timeout" else f"error (rc {rc})",
                      "detail": (progress or tail)[0][:300]}
        result["process_s"] = round(time.time() - t0, 1)
        # One log file for the whole call: few files come back from the GPU machine.
        with (self.out / f"card_caps_{self.a.table}.log").open("a") as handle:
            handle.write(f"\n===== {tag} rc={rc} {result['process_s']} s\n{text[-200_000:]}\n")
        return self.record(tag, result)

    def common(self) -> list[str]:
        a = self.a
        return ["--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]

    def record(self, tag: str, result: dict) -> dict:
        result["tag"] = tag
        self.results.append(result)
        short = {k: v for k, v in result.items() if k not in ("plan", "losses")}
        print(json.dumps(short), flush=True)
        (self.out / f"card_caps_{self.a.table}.json").write_text(json.dumps(self.results, indent=1))
        return result


def parse(text: str):
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


def table_caps(r: Runner, model_dir: Path, cap: float) -> None:
    """One cap: rawtune's default, then the eight Unsloth settings; the table and the ratio."""
    a = r.a
    rows = [("rawtune default", r.spawn(f"cap{cap:g}-rawtune", ["rawtune", "--model-dir", str(model_dir),
                                                                 "--cap", str(cap), "--run-dir",
                                                                 str(Path(a.work) / f"run-cap{cap:g}")],
                                        need_s=40, limit_s=300))]
    if a.fp8:
        rows.append(("rawtune FP8 base", r.spawn(f"cap{cap:g}-rawtune-fp8",
                                                 ["rawtune", "--fp8", "--model-dir", str(model_dir), "--cap", str(cap),
                                                  "--run-dir", str(Path(a.work) / f"run-cap{cap:g}-fp8")],
                                                 need_s=40, limit_s=300)))
    for gc in (False, True):
        for micro in MICROS:
            tag = f"cap{cap:g}-unsloth-{micro}x{EFFECTIVE // micro}-{'gc' if gc else 'nogc'}"
            if a.unsloth and tag.split("-", 2)[2] not in a.unsloth.split(","):
                continue
            args = ["unsloth", "--model-dir", str(model_dir), "--cap", str(cap), "--micro", str(micro)]
            rows.append(("Unsloth", r.spawn(tag, args + (["--gc"] if gc else []), need_s=30, limit_s=180)))
    print_caps_table(cap, rows, a.tiny)


def print_caps_table(cap: float, rows: list, tiny: bool) -> None:
    peak_label = "peak GiB" if not tiny else "peak GiB (CPU: RSS)"
    lines = [f"\n### cap {cap:g} GiB" + ("  (tiny, CPU: cap not enforced)" if tiny else ""),
             f"| variant | micro x accum | checkpointing | tokens/s | {peak_label} | loss at last step |",
             "|---|---|---|---|---|---|"]
    for name, res in rows:
        engine = res.get("engine", "")
        label = name if engine != "peft-standin" else "Unsloth stand-in (PEFT, no CUDA/unsloth)"
        if res.get("status") != "ok":
            split = f"{res.get('micro', '?')} x {res.get('accum', '?')}" if "micro" in res else _split_of(res["tag"])
            lines.append(f"| {label} | {split} | {_gc_of(res)} | {res.get('status')} | "
                         f"{res.get('peak_GiB', '-')} | - |")
            continue
        extra = f" (rawtune's own figure {num(res['rawtune_tok_s'])})" if res.get("rawtune_tok_s") else ""
        lines.append(f"| {label} | {res['micro']} x {res['accum']} | {res['gc']} | {num(res['tok_s'])}{extra} | "
                     f"{res['peak_GiB']} | {num(res['loss'], '.4f')} |")
    fitted = [res for name, res in rows if name == "Unsloth" and res.get("status") == "ok" and res.get("tok_s")]
    best = max(fitted, key=lambda res: res["tok_s"], default=None)
    for name, ours in rows:
        if name == "Unsloth":
            continue
        for s in ours.get("plan", []):
            lines.append(f"{name} plan: {s}")
        if ours.get("status") == "ok" and ours.get("tok_s") and best:
            lines.append(f"cap {cap:g} GiB: {name} {ours['tok_s']:,} tok/s / Unsloth best "
                         f"({best['micro']}x{best['accum']}, checkpointing {best['gc']}) {best['tok_s']:,} tok/s = "
                         f"{ours['tok_s'] / best['tok_s']:.2f}x")
        else:
            lines.append(f"cap {cap:g} GiB: {name}: ratio not available ({ours.get('status')}; "
                         f"Unsloth settings that fit: {len(fitted)})")
    print("\n".join(lines), flush=True)


def num(x, spec: str = ",") -> str:
    return "-" if x is None else format(x, spec)


def _split_of(tag: str) -> str:
    part = tag.split("-")[2] if tag.count("-") >= 3 else "?"
    return part.replace("x", " x ")


def _gc_of(res: dict) -> str:
    tag = res.get("tag", "")
    return "unsloth" if tag.endswith("-gc") else "off" if tag.endswith("-nogc") else res.get("gc", "plan")


def build(r: Runner, shape: str, model_dir: Path, limit_s: float) -> dict:
    res = r.spawn(f"build-{shape}", ["build", "--shape", shape, "--model-dir", str(model_dir)], need_s=20,
                  limit_s=limit_s)
    if res.get("status", "ok") != "ok" and "card" not in res:
        raise SystemExit(f"building the {shape} model failed: {res}")
    print(f"card: {res.get('card')}; model {shape}: {res.get('params', 0) / 1e9:.2f}B parameters, "
          f"{res.get('disk_GB')} GB on disk, " + ("reused from an earlier call" if res.get("reused")
                                                   else f"built in {res.get('build_s')} s"), flush=True)
    return res


def table_8b_train(r: Runner, model_dir: Path, run_dir: Path) -> list:
    """rawtune's default plan; if that does not train, once more at the seed's 2 x 8 with checkpointing."""
    a = r.a
    args = ["rawtune", "--model-dir", str(model_dir), "--cap", "24", "--run-dir", str(run_dir)]
    args += [] if a.tiny else ["--four-bit"]
    attempts = [r.spawn("8b-train", args, need_s=60, limit_s=a.budget)]
    attempts[0]["attempt"] = "rawtune's default plan"
    if attempts[0].get("status") != "ok":
        attempts.append(r.spawn("8b-train-2x8", args + ["--split", "2x8"], need_s=120, limit_s=a.budget))
        attempts[1]["attempt"] = "retry: --batch-size 2 --grad-accum 8 --gradient-checkpointing unsloth, embeddings frozen"
    (Path(a.work) / f"{model_dir.name}-train.json").write_text(json.dumps(attempts))
    return attempts


def table_8b_export(r: Runner, model_dir: Path, run_dir: Path) -> dict:
    a = r.a
    adapter = run_dir / "adapter"
    trained = (adapter / "adapter_model.safetensors").is_file()
    source = "the adapter trained above" if trained else "a RANDOM r=128 adapter (no trained adapter was found)"
    if not trained:
        r.spawn("8b-random-adapter", ["adapter", "--model-dir", str(model_dir), "--adapter-dir", str(adapter)],
                need_s=20, limit_s=300)
    res = r.spawn("8b-export", ["export", "--model-dir", str(model_dir), "--adapter-dir", str(adapter),
                                "--gguf", str(Path(a.work) / "gguf" / "card-caps-8b.f16.gguf")],
                  need_s=30, limit_s=a.budget)
    res["adapter_source"] = source
    return res


def print_8b(attempts, export_res, build_res, tiny: bool) -> None:
    lines = ["\n### 8B-class llama, 4-bit (QLoRA) under a 24 GiB cap" + ("  (tiny stand-in, CPU, 16-bit)" if tiny else "")]
    if build_res:
        lines.append(f"base: {build_res.get('params', 0) / 1e9:.2f}B parameters, bf16 safetensors "
                     f"{build_res.get('disk_GB')} GB, " + ("reused" if build_res.get("reused")
                                                           else f"written in {build_res.get('build_s')} s"))
    for train_res in attempts or []:
        lines.append(f"train ({train_res.get('attempt')}):")
        if train_res.get("status") == "ok":
            finite = all(math.isfinite(x) for x in train_res.get("losses", [])) and train_res.get("losses")
            lines += [f"train: {train_res['micro']} x {train_res['accum']}, checkpointing {train_res['gc']}, "
                      f"4-bit {train_res['four_bit']}, embeddings trained {train_res['train_embeddings']}, "
                      f"backend {train_res['backend']}",
                      f"train: losses {train_res['losses']} ({'finite' if finite else 'NOT FINITE'}), "
                      f"{num(train_res['tok_s'])} tok/s (steps {train_res['timed_steps']}), peak "
                      f"{train_res['peak_GiB']} GiB, {train_res['wall_s']} s in train(), process "
                      f"{train_res['process_s']} s"]
            lines += [f"rawtune plan: {s}" for s in train_res.get("plan", [])]
        else:
            lines.append(f"train: {train_res.get('status')} {train_res.get('detail', '')} "
                         f"(peak {train_res.get('peak_GiB', '-')} GiB)")
    if export_res:
        lines.append(f"export input: {export_res.get('adapter_source')}")
        if export_res.get("status") == "ok":
            e = export_res
            lines += [f"export (streamed merge -> F16 GGUF, CPU): {e['seconds']} s, peak RSS {e['peak_over_baseline_GiB']} "
                      f"GiB over the {e['baseline_GiB']} GiB after imports (VmHWM {e['vmhwm_GiB']} GiB), GGUF "
                      f"{e['gguf_GB']} GB, {e['tensors']} tensors "
                      f"(free disk {e['free_disk_GB']} GB), process {e['process_s']} s",
                      f"export check: {e['check']}"]
        else:
            lines.append(f"export: {export_res.get('status')} {export_res.get('detail', '')}")
        lines.append("not checked here: loading the GGUF in llama.cpp (no llama-cpp-python on this machine)")
    print("\n".join(lines), flush=True)


# ================================================================ entry points


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["build", "rawtune", "unsloth", "adapter", "export"])
    p.add_argument("--shape")
    p.add_argument("--model-dir")
    p.add_argument("--run-dir")
    p.add_argument("--adapter-dir")
    p.add_argument("--gguf")
    p.add_argument("--cap", type=float, default=24)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--gc", action="store_true")
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--fp8", action="store_true", help="RAWTUNE_FP8=1 (FP8 frozen base weights)")
    p.add_argument("--split", help="MxK: micro-batch x accumulation, with checkpointing, embeddings frozen")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if a.kind == "build":
        child_build(a)
    elif a.kind == "rawtune":
        child_rawtune(a)
    elif a.kind == "unsloth":
        child_unsloth(a)
    elif a.kind == "adapter":
        write_random_adapter(Path(a.adapter_dir), Path(a.model_dir))
        emit({"status": "ok"})
    else:
        Path(a.gguf).parent.mkdir(parents=True, exist_ok=True)
        child_export(a)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, choices=["caps", "8b", "8b-train", "8b-export"])
    p.add_argument("--caps", default="24,16", help="memory caps in GiB for --table caps (comma-separated)")
    p.add_argument("--work", default="/tmp/card_caps", help="scratch folder (models, run directories)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: no variant starts after this (default 560; 3000 with --tiny on a slow CPU)")
    p.add_argument("--tiny", "--dry-run", action="store_true", help="tiny shapes on a CPU, to exercise the code")
    p.add_argument("--unsloth", default="", help="only these Unsloth settings, e.g. 8x2-nogc,4x4-nogc "
                   "(default: all eight; use it to rerun the best ones of a full sweep)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant (default 8; 2 with --tiny)")
    p.add_argument("--fp8", action="store_true", help="--table caps: a second rawtune row with FP8 frozen base "
                   "weights (RAWTUNE_FP8=1; on a card without FP8 it says so and trains in bf16)")
    a = p.parse_args()
    a.seq, a.steps = (64, a.steps or 2) if a.tiny else (2048, a.steps or 8)
    a.warmup = 2
    a.budget = a.budget or (3000 if a.tiny else 560)
    work = Path(a.work).resolve()
    a.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else logs
    for folder in (logs, out):
        folder.mkdir(parents=True, exist_ok=True)
    r = Runner(a, out, logs)
    free = shutil.disk_usage(work).free / 1e9
    print(f"card_caps --table {a.table}{' --tiny' if a.tiny else ''}: work {work} ({free:.0f} GB free), "
          f"full logs {out}/card_caps_{a.table}.log, budget {a.budget:.0f} s", flush=True)
    if a.table == "caps":
        model_dir = work / ("tiny-1b" if a.tiny else "llama-1b-shape")
        build(r, "tiny-1b" if a.tiny else "1b", model_dir, limit_s=240)
        for cap in (float(c) for c in a.caps.split(",")):
            table_caps(r, model_dir, cap)
        return
    a.steps, a.warmup = 3, 0  # three optimizer steps, all of them reported
    shape = "tiny-8b" if a.tiny else "8b"
    model_dir, run_dir = work / f"llama-{shape}-shape", work / f"run-{shape}"
    build_res = build(r, shape, model_dir, limit_s=400)
    train_res = export_res = None
    if a.table in ("8b", "8b-train"):
        train_res = table_8b_train(r, model_dir, run_dir)
    elif (work / f"{model_dir.name}-train.json").is_file():
        train_res = json.loads((work / f"{model_dir.name}-train.json").read_text())
        print("train: from the earlier 8b-train call in this work folder", flush=True)
    if a.table in ("8b", "8b-export"):
        export_res = table_8b_export(r, model_dir, run_dir)
    print_8b(train_res, export_res, build_res, a.tiny)


if __name__ == "__main__":
    main()
