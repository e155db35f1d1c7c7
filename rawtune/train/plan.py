"""The memory planner: how 'auto' training settings are resolved on a CUDA card.

Called by :func:`rawtune.train.train` only when CUDA is available. It keeps the user's effective
batch (micro-batch x accumulation) and learning-rate schedule; with gradient checkpointing 'auto'
it chooses, from the card's memory and the model's shape, the largest micro-batch the fast CUDA
loop (:mod:`rawtune.train.fast_loop`) can run without checkpointing. Where the fast loop does not apply
(another architecture, 4-bit, LoRA dropout, a card without bf16) it keeps the user's split and
turns checkpointing on only on small cards. :func:`choose` is a pure function, so the choice for
any card size can be shown without that card (``python -m rawtune.train.plan MODEL_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

from ..settings import TrainSettings

GIB = 2**30
# Measured on an H200 (docs/benchmarks.md): peak allocated bytes per token of the micro-batch,
# divided by the estimate below, for the fast loop at seq 2048. Keeps the estimate honest.
CALIBRATION = 1.35
RESERVE = 1.5 * GIB  # CUDA context, allocator fragmentation and cuBLAS workspaces


@dataclasses.dataclass
class Plan:
    """What the card will run: the split of the effective batch, checkpointing and the engine."""

    micro_batch: int
    grad_accum: int
    checkpointing: str
    fast_loop: bool
    predicted_peak_gib: float
    why: str


def model_shape(local_dir: str) -> dict:
    """config.json of a local HF folder ({} if there is none)."""
    path = Path(local_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _lora_params(t: TrainSettings, c: dict) -> int:
    d, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    per_layer = sum(t.lora_r * (i + o) for name, (i, o) in dims.items() if name in t.target_modules)
    return per_layer * c["num_hidden_layers"]


def estimate_fast_bytes(t: TrainSettings, c: dict, micro: int) -> int:
    """Predicted peak allocated bytes of the fast loop at this micro-batch (no checkpointing)."""
    d, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    base = layers * (d * (q + 2 * kv) + q * d + 3 * d * inter) + vocab * d * (1 if c.get("tie_word_embeddings") else 2)
    frozen = base * 2 + layers * (d * (q + 2 * kv) + 2 * d * inter) * 2  # bf16 weights + fused q/k/v, gate/up copies
    trainable = _lora_params(t, c) + (2 * vocab * d if t.train_embeddings else 0)
    states = trainable * 16  # fp32 weight, gradient and two AdamW moments
    r_in = t.lora_r * len(t.target_modules)
    per_token_layer = 2 * (6 * d + q + 2 * kv + 3 * inter + r_in)  # bf16 activations kept for backward
    tokens = micro * t.seq_len
    rows = min(tokens, max(t.seq_len, 4096))
    loss = rows * vocab * 2 * 3 + vocab * d * 4 + tokens * d * 2 * 2  # one chunk's logits/grads, dW, dh
    return int(frozen + states + CALIBRATION * tokens * layers * per_token_layer + loss)


def choose(t: TrainSettings, config: dict, total_bytes: int, bf16: bool = True) -> Plan:
    """The plan for a card of ``total_bytes`` memory (pure: no GPU needed)."""
    from .fast_loop import why_not_for_settings

    effective = t.batch_size * t.grad_accum
    gc = str(t.gradient_checkpointing)
    budget = total_bytes * 0.92 - RESERVE
    why_not = why_not_for_settings(dataclasses.replace(t, gradient_checkpointing="off"), config, bf16=bf16) if config else "no config.json"
    if gc == "auto" and why_not is None:
        for micro in sorted((m for m in range(1, effective + 1) if effective % m == 0), reverse=True):
            peak = estimate_fast_bytes(t, config, micro)
            if peak <= budget:
                return Plan(micro, effective // micro, "off", True, peak / GIB,
                            f"largest micro-batch dividing {effective} that fits {budget / GIB:.1f} GiB")
        why_not = "one block does not fit without checkpointing"
    if gc == "auto":
        gc = "off" if total_bytes >= 40 * GIB else "unsloth"
    fast = why_not is None and gc in ("off", "False")
    peak = estimate_fast_bytes(t, config, t.batch_size) / GIB if fast and config else float("nan")
    return Plan(t.batch_size, t.grad_accum, gc, fast, peak, why_not or "settings kept as given")


def card_bytes() -> int:
    """The card's memory, or RAWTUNE_GPU_MEMORY_GIB when set (to plan for a smaller or shared card)."""
    import torch

    override = os.environ.get("RAWTUNE_GPU_MEMORY_GIB")
    if override:
        return int(float(override) * GIB)
    return torch.cuda.get_device_properties(0).total_memory


def plan(t: TrainSettings, local_dir: str, log: Callable[[str], None] = print) -> TrainSettings:
    """Resolve gradient checkpointing and the micro-batch split for this card."""
    import torch

    total = card_bytes()
    p = choose(t, model_shape(local_dir), total, bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    engine = "fast CUDA loop" if p.fast_loop else f"Trainer ({p.why})"
    log(f"[gpu] {torch.cuda.get_device_name(0)} ({total / GIB:.0f} GiB): micro-batch {p.micro_batch} x "
        f"{p.grad_accum} accumulation, checkpointing {p.checkpointing}, {engine}"
        + (f", predicted peak {p.predicted_peak_gib:.1f} GiB" if p.fast_loop else ""))
    return dataclasses.replace(t, batch_size=p.micro_batch, grad_accum=p.grad_accum, gradient_checkpointing=p.checkpointing)


def main(argv: Optional[list] = None) -> None:
    """Print the plan the default recipe gets on common card sizes for a model folder."""
    import argparse

    from ..settings import RunSettings, validate

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args(argv)
    s = RunSettings()
    s.train.preset = "standard"  # the seed's recipe, which 'auto' picks on CUDA
    if args.seq_len:
        s.train.seq_len = args.seq_len
    t = validate(s).train
    c = model_shape(args.model_dir)
    for name, gib, bf16 in (("80 GiB (H100)", 80, True), ("24 GiB (L4, A10G)", 24, True),
                            ("16 GiB with bf16", 16, True), ("16 GiB T4 (no bf16)", 15, False)):
        p = choose(t, c, gib * GIB, bf16)
        print(f"{name:22s} micro-batch {p.micro_batch:2d} x {p.grad_accum:2d}, checkpointing {p.checkpointing:7s} "
              f"fast loop {'yes' if p.fast_loop else 'no '} predicted peak {p.predicted_peak_gib:5.1f} GiB  ({p.why})")


if __name__ == "__main__":
    main()
