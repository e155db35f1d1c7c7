"""The model's own forward as the loss of rawtune's loop, for models the fast model does not cover.

Above the fast loop's size (:data:`.engine.FAST_LOOP_MAX_PARAMS`), for families it does not
flatten, or with checkpointing, Unsloth's patched model is the fastest way to compute the loss
(4-bit bases stay in the Trainer, where they were measured). Around it the
Trainer cost 2-4 % at a 1B shape held to 24 and 16 GiB (``bench/card_caps.py``: 0.96x-0.98x a bare
loop at the same micro-batch and peak memory). :class:`ModelLoss` gives :mod:`.fast_loop` the interface of :class:`.fast_model.FastModel`, so
that loop's step (the loss summed over the step's tokens and divided by their count, clipping,
AdamW, schedule), its checkpoints, stop and progress drive Unsloth's model directly.

The labels are the fast loop's, already shifted (``shift_labels``), and the step's token count
goes in as ``num_items_in_batch``, as the Trainer passes it; both Unsloth's fused loss and
transformers' loss read these two arguments.

The default for Unsloth's model on a bf16 card (``RAWTUNE_UNSLOTH_LOOP=trainer`` keeps the Trainer):
at a 1B shape held to 24 and 16 GiB on an H100 it ran 1.04x and 1.06x the bare Unsloth loop, where
the Trainer ran 0.96x and 0.98x (docs/benchmarks.md). fp16 cards keep the Trainer for its loss scaling.
"""

from __future__ import annotations

from typing import Any


class ModelLoss:
    """``loss(ids, labels, n_items)``: the PEFT model's own forward, returning sum/n_items."""

    compiled = graphs = False

    def __init__(self, model: Any):
        self.model = model
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        model.train()

    def begin(self) -> None:
        """Nothing to mark: the model's own forward records no CUDA graphs."""

    def loss(self, ids: Any, labels: Any, n_items: Any) -> Any:
        return self.model(input_ids=ids, labels=ids, shift_labels=labels, num_items_in_batch=n_items).loss
