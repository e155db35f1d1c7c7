"""The Trainer path: the LoRA model for each backend and a transformers ``Trainer`` over the blocks.

Two backends share this loop (a ``Trainer`` over pre-packed blocks, which measured faster than
TRL's packing on CPU): ``unsloth`` (its fast model loader and kernels; CUDA only, imported
inside the function) and ``peft`` (plain transformers + PEFT, anywhere). embed_tokens/lm_head
are trained fully with their own learning rate when asked. The loop reports through
:class:`.progress.Progress` and stops at :class:`.progress.StopSignal`'s request after the
current step, saving a resumable checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, TrainError
from ..rundir import RunDir
from ..settings import EMBEDDING_MODULES, TrainSettings, has_cuda
from .distributed import Dist, trainer_accumulation
from .optim import param_groups
from .progress import LoopResult, Progress, StopSignal, step_of


# ---------------------------------------------------------------- backend choice


def choose_backend(requested: str) -> str:
    """auto -> unsloth where CUDA and unsloth are available, else peft; check explicit choices."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if has_cuda() and has_unsloth else "peft"
    if requested == "unsloth":
        if not has_cuda():
            raise ConfigError("--backend unsloth needs a CUDA GPU; use --backend peft (or auto) on this machine")
        if not has_unsloth:
            raise ConfigError("--backend unsloth: unsloth is not installed; `pip install -r requirements.txt` or use --backend peft")
    return requested


def import_backend_first(requested: str) -> None:
    """Import unsloth before anything imports transformers, when it is the backend that will run.

    Unsloth patches transformers, TRL and PEFT as it is imported and warns ("may run slower")
    when they were imported first; the pipeline calls this before the data stage loads a
    tokenizer. Only where CUDA is available: unsloth is a GPU-only import.
    """
    if requested not in ("auto", "unsloth") or importlib.util.find_spec("unsloth") is None or not has_cuda():
        return
    import unsloth  # noqa: F401  (import order is the point)


# ---------------------------------------------------------------- data


class BlockDataset:
    """Packed token blocks as causal-LM examples (labels are the inputs; the model shifts them)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        import torch

        ids = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------- models


def peft_config(t: TrainSettings, parameters: Optional[list[str]] = None) -> Any:
    """The LoRA configuration of ``t`` for PEFT; ``parameters``: weights adapted directly (PEFT's
    ``target_parameters``, the family's experts), where the family declares them."""
    from peft import LoraConfig

    extra = {"target_parameters": list(parameters)} if parameters else {}
    return LoraConfig(
        r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, use_rslora=t.use_rslora,
        target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM",
        modules_to_save=list(EMBEDDING_MODULES) if t.train_embeddings else None, **extra,
    )


def load_peft(t: TrainSettings, local_dir: str) -> Any:
    """transformers + PEFT: fp32 on CPU, bf16 on CUDA (fp16 without bf16), 4-bit with bitsandbytes when asked."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if has_cuda():
        kwargs["dtype"] = torch.bfloat16 if _bf16_ok() else torch.float16
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # LOCAL_RANK's GPU in a data-parallel job
    if t.load_in_4bit:
        if not has_cuda():
            raise ConfigError("--load-in-4bit needs a CUDA GPU and bitsandbytes; drop it on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
    t = with_model_targets(model, t)
    check_targets(model, t)
    if t.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_checkpointing(t) != "off")
    elif _checkpointing(t) != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # LoRA's A matrices are drawn from torch's global generator: seed it here so --seed decides
    # the initial adapter, whatever ran before in this process (Unsloth gets random_state).
    torch.manual_seed(t.seed)
    model = get_peft_model(model, peft_config(t, family_parameters(model, t)))
    if kwargs["dtype"] == torch.float16:
        # fp16 mixed precision unscales fp32 gradients only: PEFT upcasts LoRA, not the trained
        # embed_tokens/lm_head copies.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return model


def load_unsloth(t: TrainSettings, local_dir: str) -> Any:
    """Unsloth's loader and LoRA wrapper (CUDA only; imported here so CPU installs never need it)."""
    from unsloth import FastLanguageModel  # noqa: F401  (patches transformers on import)

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=local_dir, max_seq_length=t.seq_len, dtype=None, load_in_4bit=t.load_in_4bit)
    _check_vocab_kept(model, local_dir)
    t = with_model_targets(model, t)
    check_targets(model, t)
    gc = _checkpointing(t)
    targets = list(t.target_modules) + (list(EMBEDDING_MODULES) if t.train_embeddings else [])
    return FastLanguageModel.get_peft_model(
        model, r=t.lora_r, target_modules=targets, lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout, bias="none", use_rslora=t.use_rslora, random_state=t.seed,
        use_gradient_checkpointing={"off": False, "on": True, "unsloth": "unsloth"}[gc],
        max_seq_length=t.seq_len)


def _check_vocab_kept(model: Any, local_dir: str) -> None:
    """Refuse to train when Unsloth grew the vocabulary (it adds a pad token when the tokenizer has
    no usable one): the adapter would then not load onto the base for eval, merge and export, and the
    run would be lost at its last step. rawtune packs blocks without padding, so PEFT needs none."""
    import json

    config = json.loads((Path(local_dir) / "config.json").read_text(encoding="utf-8"))
    expected = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    rows = model.get_input_embeddings().weight.shape[0]
    if expected and rows != expected:
        raise TrainError(f"--backend unsloth: Unsloth resized the embeddings from {expected} to {rows} rows "
                         "(it added a pad token this tokenizer lacks), so the adapter would not fit the "
                         "base model; train this model with --backend peft")


def _checkpointing(t: TrainSettings) -> str:
    """Resolve gradient checkpointing to on/off/unsloth ('auto' is decided by the memory plan)."""
    value = str(t.gradient_checkpointing)
    if value in ("True", "on"):
        return "on"
    if value in ("False", "off"):
        return "off"
    if value == "auto":
        return "off"  # the memory plan replaces 'auto' on CUDA; on CPU memory is not the limit
    return value


def family_parameters(model: Any, t: TrainSettings) -> list[str]:
    """The parameters the model's family adapts directly with LoRA for this preset ([] for most families)."""
    from .. import families

    return families.lora_parameters(families.family_for_config(model.config.to_dict()), t.preset)


def with_model_targets(model: Any, t: TrainSettings) -> TrainSettings:
    """``t`` with its target modules spelled as the loaded model names them: the family registry maps
    split names onto fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``), generic names onto
    the family's modules of that layer kind, and adds the kinds the family's preset trains."""
    from .. import families

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    family = families.family_for_config(model.config.to_dict())
    targets = families.lora_targets(family, list(t.target_modules), names, getattr(t, "preset", None))
    return t if targets == list(t.target_modules) else dataclasses.replace(t, target_modules=targets)


def check_targets(model: Any, t: TrainSettings) -> None:
    """Every requested projection must exist in the model, or LoRA would silently skip it."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in t.target_modules if m not in names]
    if missing:
        found = sorted(n for n in names if n.endswith("proj"))
        raise ConfigError(f"--target-modules {','.join(missing)} not found in this model; it has: {', '.join(found)}")


# ---------------------------------------------------------------- trainer


def _trainer_class() -> type:
    from transformers import Trainer

    class RawtuneTrainer(Trainer):
        """A Trainer whose optimizer gives embeddings their own learning rate."""

        embedding_learning_rate: float = 0.0

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                groups = param_groups(self.model, self.args.learning_rate,
                                      self.embedding_learning_rate, self.args.weight_decay)
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

    return RawtuneTrainer


def _optimizer(t: TrainSettings) -> str:
    if t.optimizer != "auto":
        if t.optimizer == "adamw_8bit" and not has_cuda():
            raise ConfigError("--optimizer adamw_8bit needs CUDA and bitsandbytes; use adamw_torch on CPU")
        return t.optimizer
    # 8-bit AdamW only where memory is what limits (4-bit loading): elsewhere the planner counts
    # 32-bit moments anyway, and one fused kernel beat bitsandbytes' per-tensor steps (13 % of the
    # step time at the 1B shape, r=128, 224 LoRA tensors).
    if has_cuda() and t.load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit"
    return "adamw_torch_fused" if has_cuda() else "adamw_torch"


def training_arguments(t: TrainSettings, run: RunDir, has_eval: bool, world: int = 1) -> Any:
    from transformers import TrainingArguments

    cuda = has_cuda()
    eval_every = t.eval_steps if has_eval and t.eval_steps else 0
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=trainer_accumulation(t, world),
        num_train_epochs=t.epochs, max_steps=t.max_steps if t.max_steps else -1,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay, optim=_optimizer(t), seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=2, eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, use_cpu=not cuda,
        bf16=cuda and _bf16_ok(), fp16=cuda and not _bf16_ok(), dataloader_num_workers=0, max_grad_norm=1.0,
        **({"ddp_find_unused_parameters": False} if world > 1 else {}),  # LoRA uses every trainable tensor
    )


def _bf16_ok() -> bool:
    import torch

    # Native bf16 only: a T4 "supports" it by emulation, far slower than its fp16 tensor cores.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _trainer_callback(progress: Progress, stop: StopSignal, dist: Dist) -> Any:
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        """Hands the Trainer's logs and evaluations to ``progress``, and its stop requests back."""

        def on_train_begin(self, args, state, control, **kw):
            self.first = state.global_step + 1

        def on_step_end(self, args, state, control, **kw):
            # Time from the first finished step, as the fast loop does: its compiling and
            # allocator warm-up are not training (they made a 10-step bench read 6x slow).
            if state.global_step == self.first:
                progress.meter.mark(state.global_step)
            return self._check_stop(control)

        def _check_stop(self, control):
            if dist.should_stop(stop):
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            progress.step(state.global_step, state.max_steps, float(logs["loss"]),
                          float(logs.get("learning_rate", 0.0)), float(state.epoch or 0.0))
            # Checked again after the callback, which may have asked to stop at this very step. With
            # several processes only at the step's end, where every rank agrees on it together.
            return control if dist.active else self._check_stop(control)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                progress.eval(state.global_step, float(metrics["eval_loss"]))

    return Report()


def _quiet(trainer: Any) -> None:
    """Drop the Trainer's own printing: rawtune's progress reports instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


# ---------------------------------------------------------------- the loop


def fit(t: TrainSettings, run: RunDir, model: Any, train_blocks: np.ndarray, held: np.ndarray,
        progress: Progress, stop: StopSignal, resume_from: Optional[Path], dist: Optional[Dist] = None) -> LoopResult:
    """Train ``model`` with the Trainer; checkpoints go to ``checkpoints/``.

    In a data-parallel job (``dist``) the Trainer itself spreads the blocks over the ranks and
    averages the gradients; each rank accumulates ``grad_accum / world`` micro-batches, so the
    effective batch is that of one process, and only rank 0 writes checkpoints.
    """
    dist = dist or Dist()
    eval_blocks = held[: t.eval_batches * t.batch_size]
    trainer = _trainer_class()(
        model=model, args=training_arguments(t, run, len(eval_blocks) > 0, dist.world),
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks) if len(eval_blocks) else None,
        callbacks=[_trainer_callback(progress, stop, dist)])
    trainer.embedding_learning_rate = t.embedding_learning_rate
    _quiet(trainer)
    started = time.time()
    with stop:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return LoopResult(trainer.state.global_step, trainer.state.max_steps, step_of(resume_from),
                      time.time() - started)
