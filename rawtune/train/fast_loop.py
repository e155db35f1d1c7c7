"""The fast CUDA training loop: LoRA on llama-shaped models without the Trainer's overheads.

Why it exists: on a GPU the Trainer path runs SmolLM2-135M at 1-14 % of the card's
arithmetic rate; the time goes to Python, small kernel launches, un-fused elementwise work and
the [tokens, 49k] logits tensor. This loop trains the *same parameters* of the PEFT model that
:mod:`rawtune.train` built (LoRA A/B, the trained embed_tokens/lm_head copies), with the same
maths: the loss is summed over the tokens of one optimizer step and divided by their count (as
the Trainer does with ``num_items_in_batch``), the same parameter groups, AdamW, LR schedule
(:mod:`.optim`) and gradient clipping at 1.0. What changes is how it runs:

- one hand-written decoder layer, compiled once with ``torch.compile`` and reused for all layers
  (the elementwise work around the matmuls is fused; q/k/v and gate/up share one base matmul and
  one LoRA-A matmul);
- attention through ``scaled_dot_product_attention`` (flash / cuDNN kernels, causal, GQA);
- a chunked cross-entropy that computes the loss and its gradients chunk by chunk, so the full
  logits never exist in memory;
- micro-batches as large as the card allows (the memory plan, :mod:`.plan`, picks them, keeping the effective
  batch), no gradient checkpointing, the step's loss read back one step late and the step's inputs
  copied without a synchronisation (:func:`to_device`), so the GPU never waits on Python;
- every step full: the blocks are read as one stream of shuffled epochs (:func:`step_blocks`).

Families: one layer function covers every architecture whose decoder layer it computes exactly
(the families that declare ``Training(fast_loop=True)`` in :mod:`rawtune.families`, with their
own check for checkpoints that differ, :func:`archs`): RMSNorm over each head of q and k before
RoPE or over all of them, norms after attention and MLP instead of before, layers without RoPE,
embedding/residual/attention/logit multipliers, q/k/v biases. Other families train on the
Trainer path, said in one log line.

The model side (flattening, the layer function, the chunked loss) is :mod:`.fast_model`.

Data parallel (several processes, :mod:`.distributed`): every rank computes the same step on its
share of that step's blocks, with the loss divided by the token count of the whole step, and the
trainable tensors' gradients are summed over the ranks before clipping, so the step equals one
process's; only rank 0 evaluates, logs and writes checkpoints.

Checkpoints are ``checkpoints/checkpoint-N`` folders with the adapter and ``fastloop_state.pt``;
only this loop resumes them, and reads the state back with ``weights_only=True`` (plain tensors
and numbers: loading a checkpoint can never run code).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .. import env
from ..rundir import RunDir
from ..settings import TrainSettings
from .checkpoints import STATE_FILE
from .checkpoints import load as load_checkpoint
from .checkpoints import save as save_checkpoint
from . import fp8
from .engine import compile_allowed, compile_mode
from .distributed import Dist, OverlappedReduce, broadcast_params, shard
from .fast_model import PROJ, FastModel, Net, base_linear, extract, float_types, projection, shifted_labels
from .optim import param_groups, schedule
from .progress import LoopResult, Progress, StopSignal



def archs() -> tuple[str, ...]:
    """The model types whose layer the fast loop computes (families with ``Training.fast_loop``)."""
    from .. import families

    return tuple(k for f in families.all_families() if f.training.fast_loop for k in f.model_types)


# ---------------------------------------------------------------- when it applies


def disabled() -> bool:
    """RAWTUNE_FASTLOOP=0 sends CUDA training back to the Trainer path (for comparisons)."""
    return env.get("RAWTUNE_FASTLOOP") == "0"


def why_not_for_settings(t: TrainSettings, config: dict, bf16: Optional[bool] = None,
                         unsloth: bool = True) -> Optional[str]:
    """Before any model is loaded: None when the fast loop can train this recipe on this
    architecture (``config.json``) and card, else the reason why not. The memory plan asks this.

    ``bf16``: whether the card computes in bf16 (None: ask the current CUDA device).
    ``unsloth``: whether the run loads the model with Unsloth (the size rule applies only then).
    """
    if disabled():
        return "RAWTUNE_FASTLOOP=0"
    if config.get("model_type") not in archs():
        return f"architecture {config.get('model_type')!r} (the fast loop knows {', '.join(archs())})"
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        return "an MLP other than SiLU-gated without bias"
    reason = family_reason(t, config)
    if reason:
        return reason
    if t.load_in_4bit:
        return "4-bit loading (bitsandbytes layers)"
    if t.lora_dropout:
        return "LoRA dropout"
    if str(t.gradient_checkpointing) in ("on", "True", "unsloth"):
        return f"gradient checkpointing '{t.gradient_checkpointing}' was asked for"
    from .engine import fast_loop_veto  # ZeroGPU (no torch.compile) and 1B-class models

    if veto := fast_loop_veto(t, config, unsloth):
        return veto
    if bf16 is None:
        import torch

        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if not bf16:
        return "a GPU without bf16"
    return None


def own_forward_asked() -> bool:
    """Train Unsloth's model in this loop rather than in the Trainer, unless RAWTUNE_UNSLOTH_LOOP=trainer."""
    return env.get("RAWTUNE_UNSLOTH_LOOP").lower() != "trainer"


def own_forward_veto(four_bit: bool, bf16: bool, backend: str = "unsloth") -> Optional[str]:
    """Why Unsloth's model stays in the Trainer rather than this loop (None: it trains here).
    The training stage and the plan's description both ask this."""
    if disabled():
        return "RAWTUNE_FASTLOOP=0"
    if not own_forward_asked():
        return "RAWTUNE_UNSLOTH_LOOP=trainer"
    if backend != "unsloth":
        return "PEFT's model trains in the Trainer"
    if four_bit:  # measured in the Trainer (8B under 24 GiB); this loop is measured on 16-bit models
        return "4-bit models train in the Trainer"
    if not bf16:
        return "fp16 needs the Trainer's loss scaling"
    return None


def why_not_own_forward(backend: str, resume_from: Optional[Path], four_bit: bool = False) -> Optional[str]:
    """None when this loop can drive the model's own forward instead of the Trainer (Unsloth's
    16-bit model on a bf16 card, unless RAWTUNE_UNSLOTH_LOOP=trainer), else why not."""
    import torch

    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return own_forward_veto(four_bit, bf16, backend) or trainer_checkpoint(resume_from)


def trainer_checkpoint(resume_from: Optional[Path]) -> Optional[str]:
    """Why this loop cannot resume ``resume_from`` (a Trainer checkpoint), None when it can or there is none."""
    if resume_from is not None and not (resume_from / STATE_FILE).is_file():
        return f"{resume_from.name} was written by the Trainer path"
    return None


def family_reason(t: TrainSettings, config: dict) -> Optional[str]:
    """Why this checkpoint's layer differs from the one the fast loop computes (None when it does not):
    the family's own check (sliding windows, attention biases)."""
    from .. import families

    family = families.family_for_config(config)
    check = family.training.fast_loop_check if family is not None else None
    return check(config, t.seq_len) if check else None


def why_not_for_model(model: Any, t: TrainSettings, resume_from: Optional[Path],
                      unsloth: bool = True) -> Optional[str]:
    """After loading: None when the fast loop can train this PEFT model (plain LoRA on float
    weights) and resume this checkpoint, else why not. Includes :func:`why_not_for_settings`
    (``unsloth``: the model was loaded by Unsloth)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = why_not_for_settings(t, base.config.to_dict(), unsloth=unsloth)
    if reason:
        return reason
    if reason := trainer_checkpoint(resume_from):
        return reason
    for layer in base.model.layers:
        for name in PROJ:
            mod = projection(layer, name)
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                if type(mod.lora_A["default"]).__name__ != "Linear" or getattr(mod, "use_dora", {}).get("default"):
                    return "a LoRA variant other than plain LoRA"
            if not hasattr(base_linear(mod), "weight") or base_linear(mod).weight.dtype not in float_types():
                return "quantized base weights"
    return None


# ---------------------------------------------------------------- optimizer, schedule, state


def upcast_trainable(net: Net) -> dict:
    """Give trainable half-precision weights fp32 masters (AdamW steps of 5e-6 vanish in bf16)."""
    import torch

    original = {}
    for name, p in net.trainable:
        if p.dtype != torch.float32:
            original[name] = p.dtype
            p.data = p.data.float()
    return original


def restore_dtypes(net: Net, original: dict) -> None:
    """Cast upcast weights back, so the saved adapter has the dtypes the Trainer path writes."""
    for name, p in net.trainable:
        if name in original:
            p.data = p.data.to(original[name])


def make_optimizer(model: Any, t: TrainSettings) -> Any:
    import torch

    groups = param_groups(model, t.learning_rate, t.embedding_learning_rate, t.weight_decay)
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=torch.cuda.is_available())


def steps_per_epoch(n_blocks: int, effective: int) -> float:
    """Optimizer steps that read every block once (a fraction: steps run across epochs, :func:`step_blocks`)."""
    return n_blocks / max(min(effective, n_blocks), 1)


def total_steps(t: TrainSettings, n_blocks: int) -> int:
    """Optimizer steps of the run: --max-steps, else enough full steps to read --epochs times every block."""
    if t.max_steps:
        return int(t.max_steps)
    # (the small tolerance keeps float rounding, e.g. 0.1 * 30 / 3, from adding a step)
    return max(math.ceil(t.epochs * steps_per_epoch(n_blocks, t.batch_size * t.grad_accum) - 1e-9), 1)


def step_blocks(step: int, n_blocks: int, effective: int, seed: int) -> np.ndarray:
    """Block indices of optimizer step ``step``: ``effective`` blocks of one stream of epochs.

    Each epoch is a fresh seeded shuffle of all blocks, and the epochs follow one another in the
    stream, so every step is full: the step that finishes an epoch takes its last blocks from the
    next one. (A short last step per epoch costs as much as a full one wherever its rows are padded
    to the compiled micro-batch, as every rank's share of a half step is on 2 GPUs: with 9 steps an
    epoch, that was a ninth of the 2-GPU run's time spent on padding.) A corpus no larger than one
    step gives every step all its blocks, in a fresh order.
    """
    if n_blocks <= effective:
        return np.random.default_rng(seed + step).permutation(n_blocks)
    start = step * effective
    first, last = start // n_blocks, (start + effective - 1) // n_blocks
    stream = np.concatenate([np.random.default_rng(seed + e).permutation(n_blocks) for e in range(first, last + 1)])
    offset = start - first * n_blocks
    return stream[offset:offset + effective]


# ---------------------------------------------------------------- the loop


def evaluate(fast: FastModel, blocks: Any, micro: int) -> float:
    """Mean token loss over held-out blocks (no gradients)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(blocks), micro):
            ids = blocks[s:s + micro]
            labels = shifted_labels(ids, len(ids))
            n = torch.tensor(float((labels >= 0).sum().item()), device=ids.device)
            fast.begin()
            total += float(fast.loss(ids, labels, n).item()) * n.item()
            count += int(n.item())
    return total / max(count, 1)


class _Pending:
    """The last step's loss, read back one step late so the GPU never waits on Python."""

    def __init__(self, progress: Progress, t: TrainSettings, max_steps: int, per_epoch: float):
        self.progress, self.t, self.max_steps, self.per_epoch = progress, t, max_steps, per_epoch
        self.item: Optional[tuple] = None

    def put(self, step: int, loss: Any, lr: float) -> None:
        self.flush()
        self.item = (step, loss, lr, time.time())

    def flush(self, now: bool = False) -> None:
        """Report the held step; ``now``: time it at this moment (after a sync), not when queued."""
        if self.item is None:
            return
        step, loss, lr, done_at = self.item
        self.item = None
        show = bool(self.t.logging_steps) and (step % self.t.logging_steps == 0 or step == self.max_steps)
        self.progress.step(step, self.max_steps, float(loss.item()), lr, step / self.per_epoch,
                           when=time.time() if now else done_at, show=show)


def _train_step(fast: FastModel, blocks: Any, idx: Any, micro: int, n_items: Any,
                reduce: Optional[OverlappedReduce] = None) -> Any:
    """Forward and backward over one optimizer step's blocks in micro-batches; the summed loss.

    ``reduce`` (several processes): the gradients are summed over the ranks, starting during the
    last micro-batch's backward.
    """
    import torch

    T, device = blocks.shape[1], n_items.device
    step_loss = torch.zeros((), device=device)
    starts = range(0, len(idx), micro)
    for s in starts:
        ids = to_device(blocks[idx[s:s + micro]], device)  # a no-op where the blocks live on the card
        real = len(ids)
        if real < micro:  # keep one shape (no recompiles): pad rows carry no labels
            ids = torch.cat([ids, ids.new_zeros(micro - real, T)])
        if reduce is not None and s == starts[-1]:
            reduce.arm()
        fast.begin()
        loss = fast.loss(ids, shifted_labels(ids, real), n_items)
        loss.backward()
        step_loss += loss.detach()
    if reduce is not None:
        reduce.finish()
    return step_loss


def fp8_base(device: Any, own_forward: bool, log: Any) -> bool:
    """Whether the frozen base weights go FP8 (RAWTUNE_FP8=1 and a card that has FP8; else one log line)."""
    if env.get("RAWTUNE_FP8") != "1":
        return False
    reason = "the model's own forward keeps its weights" if own_forward else fp8.why_not(device)
    if reason:
        log(f"[train] RAWTUNE_FP8=1 not used: {reason}; base weights stay bf16")
        return False
    log("[train] frozen base weights in FP8 (e4m3, per-channel scales)")
    return True


def _loss_model(model: Any, device: Any, own_forward: bool, use_fp8: bool = False) -> tuple:
    """(the loss computer, its trainable (name, parameter) pairs, what to call at the end to give
    the trained tensors back their dtypes)."""
    import torch

    if own_forward:  # the model's (Unsloth's) forward; its parameters keep the dtypes the Trainer sees
        from .model_loss import ModelLoss

        loss = ModelLoss(model)
        return loss, loss.trainable, lambda: None
    net = extract(model, None if device.type == "cuda" else torch.float32, fp8=use_fp8)
    original = upcast_trainable(net)
    back = offload_frozen(model) if use_fp8 else (lambda: None)
    # never compiled on ZeroGPU or with RAWTUNE_COMPILE=0
    fast = FastModel(net, compile=compile_allowed(), mode=compile_mode())
    return fast, net.trainable, lambda: (restore_dtypes(net, original), back())


def offload_frozen(model: Any) -> Callable[[], None]:
    """Move the LoRA'd projections' frozen weights to host memory while the FP8 copies train; the
    returned function brings them back (checkpoints save only the adapter, which stays on the card).

    Without this the card would hold each base weight twice (bf16 in the model, FP8 in the net).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    moved = []
    for layer in base.model.layers:
        for name in PROJ:
            weight = base_linear(projection(layer, name)).weight
            moved.append((weight, weight.device))
            weight.data = weight.data.to("cpu")

    def back() -> None:
        for weight, device in moved:
            weight.data = weight.data.to(device)

    return back


# Token blocks up to this size sit on the card (no copy per micro-batch); a larger corpus stays in
# CPU memory, so a big dataset cannot take the memory the plan gave the model (100M tokens: 800 MB).
BLOCKS_ON_CARD_BYTES = 256 * 2**20


def to_device(tensor: Any, device: Any) -> Any:
    """``tensor`` on ``device`` without making the host wait for the card.

    A plain copy from ordinary (pageable) host memory synchronises the stream: the host waits until
    the card has finished everything queued, then queues the next layers while the card idles. With
    these copies and the stop flag (:meth:`.distributed.Dist.should_stop`) no longer waiting, a
    2-GPU step at 135M went from 133.4 to 124.4 ms (2 H200s; two calls, the 1-GPU step 238-239 ms in
    both; ``bench/ddp_profile.py``). From pinned memory the copy is queued like a kernel; PyTorch's
    pinned-memory cache keeps the buffer until the copy is done.
    """
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _grads_of_their_own(params: list) -> None:
    """Give each trainable tensor a gradient buffer that autograd adds into.

    With CUDA graphs, a gradient autograd creates is the graph's output buffer, which the next
    micro-batch's replay overwrites before the step ends (PyTorch issue 169545): with 2 micro-batches
    a step the first backward's gradient would be lost. A buffer of our own is added into instead.
    The data-parallel path needs nothing: its gradients are views into its buckets already.
    """
    import torch

    for p in params:
        p.grad = torch.zeros_like(p)


def _train_tensor(train_blocks: np.ndarray, device: Any) -> Any:
    import torch

    blocks = torch.from_numpy(np.ascontiguousarray(train_blocks)).long()
    return blocks.to(device) if blocks.numel() * 8 <= BLOCKS_ON_CARD_BYTES else blocks


def fit(t: TrainSettings, run: RunDir, model: Any, train_blocks: np.ndarray, held: np.ndarray,
        progress: Progress, stop: StopSignal, resume_from: Optional[Path], dist: Optional[Dist] = None,
        own_forward: bool = False) -> LoopResult:
    """Train with the fast loop; the same outputs as the Trainer path (adapter weights, checkpoints).

    ``dist``: this process's place in a data-parallel job (None or one process: train alone).
    ``own_forward``: compute the loss with the model's own forward (:mod:`.model_loss`, Unsloth's
    kernels) instead of the flattened fast model.
    """
    import torch

    dist = dist or Dist()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: tests of the loop logic
    fast, trainable, restore = _loss_model(model, device, own_forward, fp8_base(device, own_forward, progress.log))
    micro, effective, T = t.batch_size, t.batch_size * t.grad_accum, t.seq_len
    blocks = _train_tensor(train_blocks, device)
    eval_blocks = torch.from_numpy(np.ascontiguousarray(held[: t.eval_batches * t.batch_size])).to(device, torch.long)
    max_steps = total_steps(t, len(train_blocks))
    optimizer = make_optimizer(model, t)
    scheduler = schedule(t, optimizer, max_steps)
    start_step = load_checkpoint(resume_from, model, optimizer, scheduler) if resume_from else 0
    params = [p for _, p in trainable]
    broadcast_params(params, dist)  # the same starting weights on every rank, as DDP's wrapper does
    reduce = OverlappedReduce(params, dist) if dist.active else None
    keep_grads = reduce is None and fast.graphs
    if keep_grads:
        _grads_of_their_own(params)
    eval_every = t.eval_steps if len(eval_blocks) and t.eval_steps else 0
    split = (f"micro-batch {micro} x {math.ceil(effective / dist.world / micro)} accumulation on each of "
             f"{dist.world} processes" if dist.active else f"micro-batch {micro} x {t.grad_accum} accumulation")
    how = "the model's own forward" if own_forward else \
        ("eager" if not fast.compiled else f"compiled{' as CUDA graphs' if fast.graphs else ''}")
    progress.log(f"[train] fast CUDA loop: {split}, {how}, {max_steps} steps")
    pending = _Pending(progress, t, max_steps, steps_per_epoch(len(train_blocks), effective))
    step = start_step
    started = time.time()
    with stop:
        while step < max_steps:
            every = step_blocks(step, len(train_blocks), effective, t.seed)
            idx = to_device(torch.from_numpy(shard(every, dist)), blocks.device)
            n_items = torch.full((), float(len(every) * (T - 1)), device=device)  # the whole step's tokens
            step_loss = _train_step(fast, blocks, idx, micro, n_items, reduce)
            dist.sum_(step_loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if reduce is None:
                optimizer.zero_grad(set_to_none=not keep_grads)
            else:
                reduce.zero()  # the gradients stay views into the buckets
            step += 1
            if progress.meter.origin is None:  # time from the first finished step: compiling is not training
                _sync()
                progress.meter.mark(step)
            pending.put(step, step_loss, lr)
            if eval_every and step % eval_every == 0 and dist.main:
                pending.flush()
                progress.eval(step, evaluate(fast, eval_blocks, micro))
            if step % t.save_steps == 0 and step < max_steps and dist.main:
                save_checkpoint(run, model, optimizer, scheduler, step)
            if dist.should_stop(stop):
                if dist.main:
                    save_checkpoint(run, model, optimizer, scheduler, step)
                break
    _sync()
    pending.flush(now=True)
    if keep_grads:
        optimizer.zero_grad(set_to_none=True)  # before restore() may change the tensors' dtypes
    restore()
    return LoopResult(step, max_steps, start_step, time.time() - started)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
