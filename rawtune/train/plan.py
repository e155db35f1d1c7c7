"""GPU training plan: how 'auto' settings are resolved on a CUDA card, and the cards rawtune plans for.

Called by :func:`rawtune.train.train` only when CUDA is available. It keeps the user's effective
batch (micro-batch x accumulation) and learning-rate schedule, and chooses from the card's memory
and the model's shape: the engine (the compiled fast CUDA loop of :mod:`rawtune.train.fast_loop` where it
was measured faster, else the Trainer with Unsloth, or with PEFT when Unsloth is missing), 16-bit or
4-bit (QLoRA) loading, the largest micro-batch that fits, checkpointing, and fp16 on cards without
bf16 (T4). Memory counts the frozen weights, LoRA and fully trained embed_tokens/lm_head with their
fp32 masters, gradients and AdamW moments (several GB for a 128k vocabulary), and activations. For a
real config.json the weights and the LoRA parameters are counted on the model built on the meta
device, with the family's own targets (DeltaNet, convolution and Mamba projections, gpt-oss's
experts); the per-token activation bytes are fitted on dense models.
On ZeroGPU (``SPACES_ZERO_GPU``, or ``RAWTUNE_ZERO_GPU=1``) nothing is compiled: Hugging Face's
ZeroGPU docs rule ``torch.compile`` out there. :func:`choose` is pure, so ``python -m rawtune.train.plan
MODEL`` prints the plan for the cards Spaces rent without a GPU. :func:`segment_seconds` sizes a
ZeroGPU training segment around the model's load and save times.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

from .. import env
from ..errors import ConfigError
from ..settings import TrainSettings
from . import engine
from .engine import compile_allowed, dims, param_count, weight_split, zero_gpu

GIB = 2**30
# Measured on an H200 (docs/benchmarks.md): peak allocated bytes per token of the micro-batch,
# divided by the estimate below, for the fast loop at seq 2048. Keeps the estimate honest.
CALIBRATION = 1.35
RESERVE = 1.5 * GIB  # CUDA context, allocator fragmentation and cuBLAS workspaces
RESERVE_SHARE = 0.05  # on large cards fragmentation grows with the tensors, so keep a share free as well


def usable_bytes(total_bytes: int) -> float:
    """What a plan may fill on a card of ``total_bytes``: all but a fixed reserve or 5 %, the larger.

    The estimates below match measured peaks within a few percent (Unsloth 8 x 2 at the 1B shape:
    21.08 GiB predicted, 21.12 GiB measured), so a flat 8 % cut on top only threw away a micro-batch
    size that fits (8 x 2 under a 24 GiB cap, 1.04x the speed of 4 x 4).
    """
    return total_bytes - max(RESERVE, RESERVE_SHARE * total_bytes)


# An explicit cap (RAWTUNE_GPU_MEMORY_GIB, what torch.cuda.set_per_process_memory_fraction enforces) bounds
# the allocator alone: the CUDA context lies outside it. Predicted peaks matched measured ones within
# 1 % (fast loop 8 x 2 at 135M: 15.3 predicted, 15.39 GiB measured; Unsloth 16 x 1: 15.45 and 15.33), so
# the margin covers allocator fragmentation and that error: 0.5 GiB or 3 % of the cap, the larger.
CAP_MARGIN = 0.5 * GIB
CAP_MARGIN_SHARE = 0.03


def capped_bytes(cap: int) -> float:
    """What a plan may fill under an explicit cap of ``cap`` bytes: all but :data:`CAP_MARGIN` or 3 %."""
    return cap - max(CAP_MARGIN, CAP_MARGIN_SHARE * cap)


@dataclasses.dataclass
class Plan:
    """What the card will run: the split of the effective batch, checkpointing and the engine."""

    micro_batch: int
    grad_accum: int
    checkpointing: str
    fast_loop: bool
    predicted_peak_gib: float
    why: str
    engine: str = "fast loop"  # fast loop, unsloth or peft
    load_in_4bit: bool = False
    precision: str = "bf16"  # bf16, or fp16 on cards without bf16 (T4)
    compiled: bool = True  # whether torch.compile is used (only the fast loop compiles)
    train_embeddings: bool = True
    embedding_state_gib: float = 0.0  # fp32 masters, gradients and AdamW moments of embed_tokens/lm_head
    flatten_refused: bool = False  # the fast loop could run, but a faster fitting setting of another engine won
    fp8: bool = False  # the fast loop holds its frozen base weights in FP8 (RAWTUNE_FP8=1 on an FP8 card)


@dataclasses.dataclass(frozen=True)
class Card:
    """A card a Space or a cloud rents: the memory torch reports, bf16 support, compute capability."""

    name: str
    gib: float
    bf16: bool
    sm: int
    compile: bool = True  # ZeroGPU forbids torch.compile


CARDS = {
    "t4": Card("T4", 14.6, False, 75),
    "l4": Card("L4", 22.0, True, 89),
    "a10g": Card("A10G", 22.0, True, 86),
    "zerogpu": Card("ZeroGPU (48 GB slice)", 44.7, True, 100, compile=False),
    "a100-40": Card("A100 40GB", 39.4, True, 80),
    "a100-80": Card("A100 80GB", 79.2, True, 80),
    "h100": Card("H100 80GB", 79.1, True, 90),
    "h200": Card("H200", 139.8, True, 90),
}

def model_shape(local_dir: str) -> dict:
    """config.json of a local HF folder ({} if there is none)."""
    path = Path(local_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _lora_params(t: TrainSettings, c: dict) -> int:
    """LoRA's trainable parameters: counted on the meta-built model for a real config.json (every
    family's layer kinds and experts, :func:`.engine.lora_params`), else Llama's seven projections."""
    counted = engine.lora_params(t, c)
    if counted is not None:
        return counted
    d, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    per_layer = sum(t.lora_r * (i + o) for name, (i, o) in dims.items() if name in t.target_modules)
    return per_layer * c["num_hidden_layers"]


def estimate_fast_bytes(t: TrainSettings, c: dict, micro: int, fp8: bool = False) -> int:
    """Predicted peak allocated bytes of the fast loop at this micro-batch (no checkpointing).
    ``fp8``: frozen projections held in FP8 (one byte each, no fused bf16 copies, the bf16 originals
    in host memory); the embeddings stay bf16. At 1B that saved 3.3 GiB on an H100 (35.2 against
    31.9 GiB, bench/fp8.py); the formula counts 2.1 GiB, erring on the safe side."""
    d, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    projections = layers * (d * (q + 2 * kv) + q * d + 3 * d * inter)
    embeddings = vocab * d * (1 if c.get("tie_word_embeddings") else 2)
    if fp8:
        frozen = projections + embeddings * 2
    else:  # bf16 weights + fused q/k/v, gate/up copies
        frozen = (projections + embeddings) * 2 + layers * (d * (q + 2 * kv) + 2 * d * inter) * 2
    trainable = _lora_params(t, c) + (2 * vocab * d if t.train_embeddings else 0)
    states = trainable * 16  # fp32 weight, gradient and two AdamW moments
    r_in = t.lora_r * len(t.target_modules)
    per_token_layer = 2 * (6 * d + q + 2 * kv + 3 * inter + r_in)  # bf16 activations kept for backward
    tokens = micro * t.seq_len
    rows = min(tokens, max(t.seq_len, 4096))
    loss = rows * vocab * 2 * 3 + vocab * d * 4 + tokens * d * 2 * 2  # one chunk's logits/grads, dW, dh
    return int(frozen + states + CALIBRATION * tokens * layers * per_token_layer + loss)


# The Trainer path (Unsloth, bf16, seq 2048, standard recipe) on the H200, no checkpointing: bytes per
# token per layer fitted to two measured slopes, 0.87 GiB per 2048-token block at 135M (hidden 576,
# intermediate 1536, 30 layers) and 2.03 GiB at the 1B shape (2048, 8192, 16 layers). The static part
# is 2 bytes per frozen weight plus STATE_BYTES per trained parameter, which matches the measured
# intercepts (1.1-1.4 GiB and 4.9 GiB).
ACT_HIDDEN, ACT_INTER = 15.8, 4.17
STATE_BYTES = 16  # fp32 master, fp32 gradient and two fp32 AdamW moments
NF4_BYTES = 0.56  # a 4-bit weight with its share of the block scales
# transformers + PEFT keep fp32 logits and their gradient: 59.3 against Unsloth's 15.3 GiB at 135M, 16 x 2048.
PEFT_LOGIT_BYTES = 29  # per vocabulary entry per token


def embedding_state_bytes(t: TrainSettings, c: dict, engine: str) -> int:
    """fp32 masters, gradients and AdamW moments of fully trained embed_tokens/lm_head.

    Unsloth trains one copy of a tied embedding (67.4M trainable at 135M against PEFT's 95.7M);
    everything else trains both.
    """
    if not t.train_embeddings:
        return 0
    d, _, _, vocab, _, _ = dims(c)
    copies = 1 if c.get("tie_word_embeddings") and engine == "unsloth" else 2
    return copies * vocab * d * STATE_BYTES


def estimate_trainer_bytes(t: TrainSettings, c: dict, micro: int, checkpointing: bool, four_bit: bool,
                           engine: str) -> int:
    """Predicted peak of the Trainer path (Unsloth or PEFT) at this micro-batch."""
    d, _, layers, vocab, _, _ = dims(c)
    quantizable, other = weight_split(c)
    weights = quantizable * (NF4_BYTES if four_bit else 2) + other * 2
    states = _lora_params(t, c) * STATE_BYTES + embedding_state_bytes(t, c, engine)
    layer = ACT_HIDDEN * d + ACT_INTER * active_intermediate(c)
    per_token = (layers * 2 * d + layer) if checkpointing else layers * layer
    if engine == "peft":
        per_token += PEFT_LOGIT_BYTES * vocab
    return int(weights + states + micro * t.seq_len * per_token)


def active_intermediate(c: dict) -> int:
    """The MLP width one token passes through: a mixture of experts runs ``num_experts_per_tok``
    experts (plus a shared expert where the family has one), a dense model its one MLP."""
    k = c.get("num_experts_per_tok") or c.get("experts_per_token")
    if not k:
        return c["intermediate_size"]
    expert = c.get("moe_intermediate_size") or c["intermediate_size"]
    shared = c.get("shared_expert_intermediate_size") or c.get("shared_intermediate_size") or 0
    return int(k) * expert + shared


def _divisors(n: int) -> list[int]:
    return sorted((m for m in range(1, n + 1) if n % m == 0), reverse=True)


# Below this micro-batch, training without checkpointing is slower than checkpointing at a larger one:
# at the 1B shape under a 16 GiB cap Unsloth ran 2 x 8 without it at 36.7k-39.0k tokens/s, 16 x 1 with
# it at 59.7k and 4 x 4 without it at 69.0k (docs/benchmarks.md).
NO_CHECKPOINTING_MIN_MICRO = 4


def speed_rank(engine: str, micro: int, checkpointing: bool, largest: int = NO_CHECKPOINTING_MIN_MICRO,
               fast_first: bool = False) -> tuple:
    """Sort key of a setting, fastest first, as measured: no checkpointing (down to micro-batch
    :data:`NO_CHECKPOINTING_MIN_MICRO`), then the largest micro-batch (fewest accumulation steps),
    then the fast loop before the Trainer engines at the same split (1.2x-1.95x Unsloth at 135M).

    ``largest``: the largest micro-batch the effective batch allows. A small micro-batch without
    checkpointing ranks behind checkpointing only where checkpointing buys a larger one; at the
    same micro-batch, recomputing activations is pure cost (a batch of 2 stays unchecked).

    ``fast_first``: the fast loop before the other engines within a tier, whatever the micro-batch
    (FP8 base weights were asked for, and only the flattened loop holds them)."""
    floor = min(NO_CHECKPOINTING_MIN_MICRO, largest)
    tier = 1 if checkpointing else (0 if micro >= floor else 2)
    fast = 0 if engine == "fast loop" else 1
    return (tier, fast, -micro) if fast_first else (tier, -micro, fast)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting the planner weighs, with its predicted peak in bytes."""

    engine: str
    micro: int
    checkpointing: bool
    four_bit: bool
    embeddings: bool
    peak: int


def candidates(t: TrainSettings, c: dict, bf16: bool, engine: str, fast_loop: bool,
               fp8: bool = False) -> list[Candidate]:
    """Every setting the plan weighs, in the order it tries them: 16-bit with the asked embeddings
    sorted by :func:`speed_rank`, then 4-bit (with checkpointing), then 4-bit with embeddings frozen,
    each of those from the largest micro-batch down.

    Larger micro-batches without checkpointing were measured on bf16 cards only (Unsloth 16x1 at
    2.9x-8.9x the seed's 2x8 with checkpointing); on a card without bf16 the given split is kept.
    """
    effective = t.batch_size * t.grad_accum
    sizes = _divisors(effective) if bf16 else [m for m in _divisors(effective) if m <= t.batch_size]
    emb = bool(t.train_embeddings)
    out: list[Candidate] = []
    if not t.load_in_4bit:
        full = [Candidate("fast loop", m, False, False, emb, estimate_fast_bytes(t, c, m, fp8))
                for m in sizes if fast_loop]
        full += [Candidate(engine, m, gc, False, emb, estimate_trainer_bytes(t, c, m, gc, False, engine))
                 for m in sizes for gc in ((False, True) if bf16 else (True,))]
        out += sorted(full, key=lambda k: speed_rank(k.engine, k.micro, k.checkpointing, max(sizes), fp8))
    for embeddings in [emb] + ([False] if emb else []):
        tt = dataclasses.replace(t, train_embeddings=embeddings)
        out += [Candidate(engine, m, True, True, embeddings, estimate_trainer_bytes(tt, c, m, True, True, engine))
                for m in sizes]
    return out


def _auto_plan(t: TrainSettings, c: dict, budget: float, bf16: bool, engine: str, why_not: Optional[str],
               fp8: bool = False) -> Plan:
    """The first of :func:`candidates` whose predicted peak fits ``budget``: the fastest that fits."""
    effective = t.batch_size * t.grad_accum
    for k in candidates(t, c, bf16, engine, why_not is None, fp8):
        if k.peak > budget:
            continue
        why = f"fastest setting per the plan's order whose predicted peak fits {budget / GIB:.1f} GiB"
        if why_not and k.engine != "fast loop":
            why = f"{why}; not the flattened fast loop: {why_not}"
        elif fp8 and k.engine == "fast loop":
            why = f"{why}; RAWTUNE_FP8=1: the flattened loop first, the only one that holds FP8 weights"
        if k.embeddings != bool(t.train_embeddings):
            why += (f"; embed_tokens/lm_head not trained: their fp32 weights, gradients and AdamW moments need "
                    f"{embedding_state_bytes(t, c, engine) / GIB:.1f} GiB")
        fast = k.engine == "fast loop"
        tt = dataclasses.replace(t, train_embeddings=k.embeddings)
        return Plan(k.micro, effective // k.micro, "unsloth" if k.checkpointing else "off", fast, k.peak / GIB, why,
                    k.engine, k.four_bit, "bf16" if bf16 else "fp16", fast and compile_allowed(), k.embeddings,
                    embedding_state_bytes(tt, c, "peft" if fast else engine) / GIB,
                    flatten_refused=why_not is None and not fast, fp8=fp8 and fast)
    need = estimate_trainer_bytes(dataclasses.replace(t, train_embeddings=False), c, 1, True, True, engine)
    raise ConfigError(f"this model needs about {need / GIB:.1f} GiB to train even in 4-bit with checkpointing at "
                      f"micro-batch 1, more than the {budget / GIB:.1f} GiB this card leaves; use a smaller model, "
                      f"a shorter --seq-len or a larger card")


def choose(t: TrainSettings, config: dict, total_bytes: int, bf16: bool = True, unsloth: bool = True,
           capped: bool = False, fp8: bool = False) -> Plan:
    """The plan for a card of ``total_bytes`` memory (pure: no GPU needed).

    ``capped``: ``total_bytes`` is an explicit cap on rawtune's allocations (``RAWTUNE_GPU_MEMORY_GIB``)
    rather than a whole card's memory, so only :func:`capped_bytes`' margin is kept free.
    ``fp8``: the fast loop would hold FP8 base weights (:func:`.fp8.will_run`). Only the flattened
    loop can, so the size rule that keeps it out in Unsloth's favour does not apply.
    """
    from .fast_loop import why_not_for_settings

    gc = str(t.gradient_checkpointing)
    budget = capped_bytes(total_bytes) if capped else usable_bytes(total_bytes)
    engine = "unsloth" if unsloth else "peft"
    why_not = (why_not_for_settings(dataclasses.replace(t, gradient_checkpointing="off"), config, bf16=bf16,
                                    unsloth=unsloth and not fp8) if config else "no config.json")
    if gc == "auto" and config:
        return _auto_plan(t, config, budget, bf16, engine, why_not, fp8)
    if gc == "auto":
        gc = "off" if total_bytes >= 40 * GIB else "unsloth"
    fast = why_not is None and gc in ("off", "False")
    if fast and config:
        peak = estimate_fast_bytes(t, config, t.batch_size, fp8) / GIB
    elif config:
        peak = estimate_trainer_bytes(t, config, t.batch_size, gc not in ("off", "False"), t.load_in_4bit, engine) / GIB
    else:
        peak = float("nan")
    return Plan(t.batch_size, t.grad_accum, gc, fast, peak, why_not or "settings kept as given",
                "fast loop" if fast else engine, t.load_in_4bit, "bf16" if bf16 else "fp16",
                fast and compile_allowed(), bool(t.train_embeddings), fp8=fp8 and fast)


def cap_bytes() -> Optional[int]:
    """RAWTUNE_GPU_MEMORY_GIB in bytes, or None when it is not set."""
    override = env.get("RAWTUNE_GPU_MEMORY_GIB")
    return int(float(override) * GIB) if override else None


def card_bytes() -> int:
    """The card's memory, or RAWTUNE_GPU_MEMORY_GIB when set (to plan for a smaller or shared card)."""
    import torch

    return cap_bytes() or torch.cuda.get_device_properties(0).total_memory


def plan(t: TrainSettings, local_dir: str, log: Callable[[str], None] = print,
         backend: Optional[str] = None) -> tuple[TrainSettings, Plan]:
    """Resolve loading, checkpointing, the micro-batch split and the engine for this card; log the plan.

    ``backend``: the loader the run will use (unsloth or peft; None: Unsloth where it is installed and
    not refused by ``t.backend``). Returns the resolved settings and the plan, whose ``flatten_refused``
    says that the flattened fast loop must not run (the plan preferred Unsloth's larger micro-batch).
    """
    import importlib.util

    import torch

    total = card_bytes()
    if backend is None:
        unsloth = t.backend != "peft" and importlib.util.find_spec("unsloth") is not None
    else:
        unsloth = backend == "unsloth"
    from .fp8 import will_run

    p = choose(t, model_shape(local_dir), total, bf16=torch.cuda.is_bf16_supported(including_emulation=False),
               unsloth=unsloth, capped=cap_bytes() is not None, fp8=will_run(torch.device("cuda")))
    log(f"[gpu] {torch.cuda.get_device_name(0)} ({total / GIB:.0f} GiB"
        f"{', capped by RAWTUNE_GPU_MEMORY_GIB' if cap_bytes() else ''}){' on ZeroGPU' if zero_gpu() else ''}: "
        + describe(p))
    return dataclasses.replace(t, batch_size=p.micro_batch, grad_accum=p.grad_accum, gradient_checkpointing=p.checkpointing,
                               load_in_4bit=p.load_in_4bit, train_embeddings=p.train_embeddings), p


def describe(p: Plan) -> str:
    """One line: engine, loading, precision, split, checkpointing, embeddings, predicted peak, why."""
    from .fast_loop import own_forward_veto

    if not p.micro_batch:  # plan_for_card's stand-in for a card the model does not fit
        return f"does not fit: {p.why}"
    own = own_forward_veto(p.load_in_4bit, p.precision == "bf16") is None
    unsloth = "fast CUDA loop + Unsloth's forward" if own else "Trainer + Unsloth"
    engine = {"fast loop": "fast CUDA loop", "unsloth": unsloth, "peft": "Trainer + PEFT"}[p.engine]
    embed = f"embeddings trained ({p.embedding_state_gib:.1f} GiB of state)" if p.train_embeddings else "embeddings frozen"
    # PEFT runs the plan's "unsloth" checkpointing as transformers' own (hf_loop._checkpointing)
    checkpointing = "on" if p.engine == "peft" and p.checkpointing == "unsloth" else p.checkpointing
    weights = "16-bit" if not p.load_in_4bit else "4-bit"
    weights += " (frozen projections FP8)" if p.fp8 else ""
    return (f"{engine}{' compiled' if p.compiled else ''}, {weights} {p.precision}, "
            f"micro-batch {p.micro_batch} x {p.grad_accum}, checkpointing {checkpointing}, {embed}, "
            f"predicted peak {p.predicted_peak_gib:.1f} GiB ({p.why})")


# ---------------------------------------------------------------- ZeroGPU segments

# A ZeroGPU call is a fresh process: it imports, loads the model, trains until the deadline, then
# finishes its step and saves a checkpoint. Load and save grow with the model, so the deadline does.
IMPORT_SECONDS = 20  # torch, transformers, Unsloth's patching, CUDA start
LOAD_SECONDS_PER_GB = 6  # reading and moving 16-bit weights onto the card
SAVE_SECONDS_PER_GB = 4  # adapter + optimizer state written per checkpoint
STEP_MARGIN_SECONDS = 30  # the step in flight at the deadline
MIN_TRAIN_SECONDS = 20


def load_seconds(c: dict) -> float:
    """Estimated time from a fresh process to a loaded model (a 1B-class guess without a config)."""
    params = param_count(c) if c and "hidden_size" in c else 1_000_000_000
    return IMPORT_SECONDS + LOAD_SECONDS_PER_GB * params * 2 / 1e9


def _save_seconds(c: dict) -> float:
    """Checkpoint save: the standard recipe's LoRA and embeddings with AdamW state (12 bytes each)."""
    if not (c and "hidden_size" in c):
        return 5 + SAVE_SECONDS_PER_GB * 4.0
    t = TrainSettings(lora_r=128, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"], train_embeddings=True)
    trained = _lora_params(t, c) + embedding_state_bytes(t, c, "peft") // STATE_BYTES
    return 5 + SAVE_SECONDS_PER_GB * trained * 12 / 1e9


def segment_seconds(c: dict, call_seconds: float) -> float:
    """Seconds from the start of a ZeroGPU call until training is asked to stop.

    The deadline leaves the checkpoint save and one step's margin inside the call; at least
    MIN_TRAIN_SECONDS of training follow the load even when that overruns a call too short for
    the model (:func:`call_seconds_for` says how long a call should be).
    """
    return max(call_seconds - _save_seconds(c) - STEP_MARGIN_SECONDS, load_seconds(c) + MIN_TRAIN_SECONDS)


def call_seconds_for(c: dict, train_seconds: float = 60) -> float:
    """How long a ZeroGPU call must be to train ``train_seconds`` after loading and before saving."""
    return load_seconds(c) + train_seconds + STEP_MARGIN_SECONDS + _save_seconds(c)


# ---------------------------------------------------------------- the CLI

def known_shape(model_id: str) -> dict:
    """config.json fields of a known model id ({} when unknown): the family registry's planner shapes,
    so the plan can be printed without downloading anything; '-Instruct' and the owner are ignored."""
    from .. import families

    return families.planner_shape(model_id)


def shape_of(spec: str) -> dict:
    """The config of a local config.json, a local folder, or a known model id ({} when none of these)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.is_dir():
        return model_shape(str(path))
    return known_shape(spec)


PRINTED = {"t4": "T4 (16 GB)", "l4": "L4 / A10G (24 GB)", "zerogpu": "ZeroGPU (48 GB)", "a100-40": "A100 40GB",
           "h100": "A100 / H100 80GB"}


def main(argv: Optional[list] = None) -> None:
    """Print the plan the default GPU recipe gets on the cards Spaces rent, for a model id, folder or config.json."""
    import argparse

    from ..settings import RunSettings, validate

    parser = argparse.ArgumentParser(description=main.__doc__)
    from .. import families

    parser.add_argument("model", help="model id (known: " + ", ".join(families.planner_keys()) + "), folder or config.json")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--preset", default="standard", help="quick, standard (the GPU default) or thorough")
    args = parser.parse_args(argv)
    c = shape_of(args.model)
    if not c:
        raise SystemExit(f"error: {args.model} is not a local folder or config.json and not a known model id "
                         f"({', '.join(families.planner_keys())}); pass the folder or its config.json")
    s = RunSettings()
    s.train.preset = args.preset
    if args.seq_len:
        s.train.seq_len = args.seq_len
    t = validate(s).train
    # As a run does: a family the registry marks as one Unsloth cannot train is planned with PEFT.
    family = families.family_for_config(c)
    unsloth = family is None or family.training.unsloth_trains
    print(f"{args.model}: {param_count(c) / 1e9:.2f}B parameters, preset {args.preset}, seq {t.seq_len}"
          + ("" if unsloth else f"; {family.label}: PEFT (the registry: Unsloth cannot train it)"))
    for key, label in PRINTED.items():
        print(f"{label:18s} {describe(plan_for_card(t, c, key, unsloth=unsloth))}")


def plan_for_card(t: TrainSettings, c: dict, key: str, unsloth: bool = True) -> Plan:
    """The plan on a card of :data:`CARDS`, made with the ZeroGPU flag set as that card has it."""
    card = CARDS[key]
    saved = {k: os.environ.get(k) for k in ("RAWTUNE_ZERO_GPU", "SPACES_ZERO_GPU")}
    os.environ.update(RAWTUNE_ZERO_GPU="0" if card.compile else "1", SPACES_ZERO_GPU="0")
    try:
        return choose(t, c, int(card.gib * GIB), bf16=card.bf16, unsloth=unsloth)
    except ConfigError as exc:
        return Plan(0, 0, "-", False, float("nan"), str(exc), "unsloth" if unsloth else "peft")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    main()
