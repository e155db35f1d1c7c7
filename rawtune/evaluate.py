"""The eval stage: held-out perplexity of the base and the tuned model on the same tokens.

Both numbers come from the blocks :func:`scoring_blocks` picks from ``data/heldout.npy``, which
training never saw, so before -> after is a like-for-like comparison. Export scores the merged
model and every GGUF on the very same blocks (and with :func:`perplexity` for PyTorch), so the
tuned model's number here and the merged model's number there are one number.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np

from .rundir import RunDir

# Held-out tokens scored per model (whole blocks, at least one): export scores every GGUF in
# llama.cpp on the CPU, so a large held-out split is sampled down to this many tokens.
SCORING_TOKEN_BUDGET = 8192


def scoring_blocks(held: np.ndarray) -> np.ndarray:
    """The held-out blocks every perplexity of a run is measured on: the first ones within the budget."""
    if held.ndim != 2 or not len(held):
        return held[:0]
    keep = max(1, min(len(held), SCORING_TOKEN_BUDGET // held.shape[1]))
    return np.asarray(held[:keep], dtype=np.int64)


def perplexity(model: Any, blocks: np.ndarray, batch_size: int = 4,
               on_logits: Optional[Callable[[int, np.ndarray], None]] = None) -> float:
    """exp(mean next-token loss) over every predicted position of ``blocks``.

    ``on_logits(first, logits)`` receives each batch's float32 logits ``[batch, seq_len, vocab]``
    (blocks ``first``, ``first + 1``, ...): export keeps them for the KL divergence of each GGUF.
    """
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(np.asarray(blocks[start:start + batch_size], dtype=np.int64)).to(device)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            if on_logits is not None:
                on_logits(start, logits.cpu().numpy())
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def evaluate_run(run: RunDir, log: Callable[[str], None] = print, batch_size: int = 4) -> dict:
    """Measure base and tuned perplexity on the held-out blocks and store them in run.json."""
    from .data import load_blocks
    from .errors import StageMissing
    from .models import load_causal_lm, load_tuned

    model_info = run.require("model", "train")
    if not run.has_adapter():
        raise StageMissing(f"{run.adapter_dir} has no adapter: run `rawtune train` first")
    held = scoring_blocks(load_blocks(run, "heldout"))
    if not len(held):
        raise StageMissing(f"{run.data_dir / 'heldout.npy'} holds no blocks: run `rawtune data` again "
                           f"with a larger --heldout-fraction")
    started = time.time()
    base = load_causal_lm(model_info["local_dir"])
    ppl_base = perplexity(base, held, batch_size)
    tuned = load_tuned(run, base=base)
    ppl_tuned = perplexity(tuned, held, batch_size)
    metrics = run.load().get("metrics", {})
    metrics.update(ppl_base=round(ppl_base, 4), ppl_tuned=round(ppl_tuned, 4),
                   heldout_tokens=int(held.size),
                   ppl_blocks=[int(held.shape[0]), int(held.shape[1])], eval_seconds=round(time.time() - started, 2))
    run.update(metrics=metrics)
    change = 100 * (ppl_tuned - ppl_base) / ppl_base
    log(f"[eval] held-out perplexity {ppl_base:.4f} -> {ppl_tuned:.4f} ({change:+.1f}%) on {held.size:,} tokens "
        f"({held.shape[0]} blocks)")
    return metrics
