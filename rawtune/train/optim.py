"""The optimizer side both training loops share: parameter groups and the learning-rate schedule.

Embeddings trained in full (embed_tokens/lm_head) get their own learning rate and no weight
decay; the schedule is transformers' own scheduler function with the Trainer's warmup rule, so
the two loops step the learning rate identically.
"""

from __future__ import annotations

import math
from typing import Any

from ..settings import EMBEDDING_MODULES, TrainSettings


def param_groups(model: Any, lr: float, embedding_lr: float, weight_decay: float) -> list[dict]:
    """LoRA weights at ``lr``; fully trained embed_tokens/lm_head at ``embedding_lr``, no decay."""
    lora, embed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (embed if any(m in name for m in EMBEDDING_MODULES) else lora).append(param)
    groups = [{"params": lora, "lr": lr, "weight_decay": weight_decay}]
    if embed:
        groups.append({"params": embed, "lr": embedding_lr, "weight_decay": 0.0})
    return groups


def warmup_steps(t: TrainSettings, max_steps: int) -> int:
    """Warmup steps as the Trainer counts them for a ratio below 1: rounded up."""
    return math.ceil(max_steps * t.warmup_ratio)


def schedule(t: TrainSettings, optimizer: Any, max_steps: int) -> Any:
    """The learning-rate schedule of ``t`` over ``max_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(t, max_steps),
                         num_training_steps=max_steps)
