"""The training stage: LoRA continued pretraining on the packed blocks of a run directory.

Two backends share one training loop (a transformers ``Trainer`` over pre-packed blocks, which
measured faster than TRL's packing on CPU): ``unsloth`` (its fast model loader and kernels;
CUDA only, imported inside the function) and ``peft`` (plain transformers + PEFT, anywhere).
embed_tokens/lm_head are trained fully with their own learning rate when asked. Progress goes
to a callback; a stop event, a STOP file or Ctrl-C stops after the current step and saves the
adapter and a resumable checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConfigError, TrainError
from .rundir import RunDir
from .settings import EMBEDDING_MODULES, FUSED_PROJECTIONS, RunSettings, TrainSettings, has_cuda

Callback = Callable[[dict], None]


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


def _peft_config(t: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, use_rslora=t.use_rslora,
        target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM",
        modules_to_save=list(EMBEDDING_MODULES) if t.train_embeddings else None,
    )


def load_peft(t: TrainSettings, local_dir: str) -> Any:
    """transformers + PEFT: fp32 on CPU, bf16 on CUDA, 4-bit with bitsandbytes when asked."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if has_cuda():
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": 0}
    if t.load_in_4bit:
        if not has_cuda():
            raise ConfigError("--load-in-4bit needs a CUDA GPU and bitsandbytes; drop it on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
    t = with_model_targets(model, t)
    check_targets(model, t)
    if t.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_checkpointing(t) != "off")
    elif _checkpointing(t) != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, _peft_config(t))


def load_unsloth(t: TrainSettings, local_dir: str) -> Any:
    """Unsloth's loader and LoRA wrapper (CUDA only; imported here so CPU installs never need it)."""
    from unsloth import FastLanguageModel  # noqa: F401  (patches transformers on import)

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=local_dir, max_seq_length=t.seq_len, dtype=None, load_in_4bit=t.load_in_4bit)
    t = with_model_targets(model, t)
    check_targets(model, t)
    gc = _checkpointing(t)
    targets = list(t.target_modules) + (list(EMBEDDING_MODULES) if t.train_embeddings else [])
    return FastLanguageModel.get_peft_model(
        model, r=t.lora_r, target_modules=targets, lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout, bias="none", use_rslora=t.use_rslora, random_state=t.seed,
        use_gradient_checkpointing={"off": False, "on": True, "unsloth": "unsloth"}[gc],
        max_seq_length=t.seq_len)


def _checkpointing(t: TrainSettings) -> str:
    """Resolve gradient checkpointing to on/off/unsloth ('auto' is decided by rawtune.gpu)."""
    value = str(t.gradient_checkpointing)
    if value in ("True", "on"):
        return "on"
    if value in ("False", "off"):
        return "off"
    if value == "auto":
        return "off"  # rawtune.gpu.plan replaces 'auto' on CUDA; on CPU memory is not the limit
    return value


def model_targets(module_names: set[str], requested: list[str]) -> list[str]:
    """The requested projections spelled as this model names them.

    Phi-3 and Phi-4-mini compute q/k/v in one ``qkv_proj`` and gate/up in one ``gate_up_proj``:
    asking for any of the split names gives the fused module its adapter (LoRA on the fused
    matrix covers the same weights). Other names pass through unchanged.
    """
    out: list[str] = []
    for name in requested:
        fused = next((f for f, parts in FUSED_PROJECTIONS.items() if name in parts), None)
        if name not in module_names and fused in module_names:
            name = fused
        if name not in out:
            out.append(name)
    return out


def with_model_targets(model: Any, t: TrainSettings) -> TrainSettings:
    """``t`` with its target modules mapped onto the loaded model's projection names."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = model_targets(names, list(t.target_modules))
    return t if targets == list(t.target_modules) else dataclasses.replace(t, target_modules=targets)


def check_targets(model: Any, t: TrainSettings) -> None:
    """Every requested projection must exist in the model, or LoRA would silently skip it."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in t.target_modules if m not in names]
    if missing:
        found = sorted(n for n in names if n.endswith("proj"))
        raise ConfigError(f"--target-modules {','.join(missing)} not found in this model; it has: {', '.join(found)}")


# ---------------------------------------------------------------- optimizer and trainer


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
    if has_cuda() and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit"
    return "adamw_torch_fused" if has_cuda() else "adamw_torch"


def training_arguments(t: TrainSettings, run: RunDir, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    cuda = has_cuda()
    eval_every = t.eval_steps if has_eval and t.eval_steps else 0
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs, max_steps=t.max_steps if t.max_steps else -1,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay, optim=_optimizer(t), seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=2, eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, use_cpu=not cuda,
        bf16=cuda and _bf16_ok(), dataloader_num_workers=0, max_grad_norm=1.0,
    )


def _bf16_ok() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------- progress and stopping


def _progress_callback(callback: Optional[Callback], stop: threading.Event, run: RunDir,
                       tokens_per_step: int, log: Callable[[str], None]) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Turns Trainer events into rawtune progress events, and honours stop requests."""

        def __init__(self):
            self.t0 = time.time()
            self.first_step: Optional[int] = None
            self.history: list[dict] = []
            self.stopped = False

        def _rate(self, state) -> tuple[float, float]:
            if self.first_step is None:
                self.first_step = state.global_step
                self.t0 = time.time()
            steps = state.global_step - self.first_step
            elapsed = max(time.time() - self.t0, 1e-9)
            tok_s = steps * tokens_per_step / elapsed if steps else 0.0
            eta = (state.max_steps - state.global_step) * elapsed / steps if steps else float("nan")
            return tok_s, eta

        def on_train_begin(self, args, state, control, **kw):
            self.first_step = state.global_step
            self.t0 = time.time()

        def _check_stop(self, control):
            if stop.is_set() or run.stop_file.exists():
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_step_end(self, args, state, control, **kw):
            return self._check_stop(control)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            tok_s, eta = self._rate(state)
            event = {"type": "step", "step": state.global_step, "max_steps": state.max_steps,
                     "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
                     "tokens_per_s": tok_s, "eta_s": eta, "epoch": float(state.epoch or 0.0)}
            self.history.append(event)
            log(f"[train] step {event['step']}/{event['max_steps']} loss {event['loss']:.4f} "
                f"{tok_s:,.0f} tok/s eta {format_duration(eta)}")
            if callback:
                callback(event)
            # Checked again after the callback, which may have asked to stop at this very step.
            return self._check_stop(control)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                event = {"type": "eval", "step": state.global_step, "eval_loss": float(metrics["eval_loss"])}
                self.history.append(event)
                log(f"[train] step {state.global_step} held-out loss {event['eval_loss']:.4f}")
                if callback:
                    callback(event)

    return Progress()


def format_duration(seconds: Optional[float]) -> str:
    """A short duration for progress lines: 59s, 1m01s, 2h01m ('?' when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class _CtrlC:
    """First Ctrl-C asks for a clean stop (adapter + checkpoint saved); the second one aborts."""

    def __init__(self, stop: threading.Event, log: Callable[[str], None]):
        self.stop, self.log, self.previous = stop, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.log("[train] stopping after this step; the adapter and a checkpoint will be saved (Ctrl-C again to abort)")
        self.stop.set()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def latest_checkpoint(run: RunDir) -> Optional[Path]:
    """The newest ``checkpoints/checkpoint-N`` folder, or None."""
    if not run.checkpoints_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run.checkpoints_dir.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- the stage


def versions(backend: str) -> dict[str, str]:
    """Versions of the libraries that shaped the result, for run.json."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("rawtune", "torch", "transformers", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    out["backend"] = backend
    return out


def train(settings: RunSettings, run: RunDir, callback: Optional[Callback] = None,
          stop: Optional[threading.Event] = None, token: Optional[str] = None,
          log: Callable[[str], None] = print) -> dict:
    """Train a LoRA adapter on ``run``'s packed blocks; return (and store) the train record."""
    from .data import load_blocks

    t = settings.train
    model_info = run.require("model", "train")
    train_blocks = load_blocks(run, "train")
    held = load_blocks(run, "heldout")
    if train_blocks.shape[1] != t.seq_len:
        raise TrainError(f"the packed blocks have length {train_blocks.shape[1]} but --seq-len is {t.seq_len}; "
                         "rerun the data stage (`rawtune train` without --resume)")
    backend = choose_backend(t.backend)
    import_backend_first(backend)  # a no-op when the pipeline already did it
    if has_cuda():
        from .gpu import plan

        t = plan(t, model_info["local_dir"], log=log)
    resume_from = None
    if t.resume:
        resume_from = latest_checkpoint(run)
        if resume_from is None:
            raise TrainError(f"--resume: no checkpoint in {run.checkpoints_dir}; run without --resume")
        if t.max_steps and _step_of(resume_from) >= t.max_steps:
            # The Trainer would take one more step past the end; a finished run has nothing to resume.
            raise TrainError(f"--resume: {run.path} has already trained all {t.max_steps} steps of --max-steps; "
                             "pass a larger --max-steps to train further")
        log(f"[train] resuming from {resume_from.name}")
    log(f"[train] backend {backend}; LoRA r={t.lora_r} alpha={t.lora_alpha}"
        f"{' rsLoRA' if t.use_rslora else ''}{' + embed_tokens/lm_head' if t.train_embeddings else ''}")
    model = (load_unsloth if backend == "unsloth" else load_peft)(t, model_info["local_dir"])
    return _fit(settings, t, run, model, backend, train_blocks, held, callback,
                stop or threading.Event(), resume_from, log)


def _fit(settings: RunSettings, t: TrainSettings, run: RunDir, model: Any, backend: str,
         train_blocks: np.ndarray, held: np.ndarray, callback: Optional[Callback],
         stop: threading.Event, resume_from: Optional[Path], log: Callable[[str], None]) -> dict:
    from .models import load_tokenizer

    if has_cuda():  # --- rawtune.gpu/fastloop (issue 6): the fast CUDA loop where it applies
        from . import fastloop

        why_not = fastloop.supports(model, t, resume_from)
        if why_not is None:
            return fastloop.fit_fast(settings, t, run, model, backend, train_blocks, held, callback,
                                     stop, resume_from, log)
        log(f"[train] Trainer loop ({why_not})")  # --- end of the fast-loop branch
    tokenizer = load_tokenizer(run.load()["model"]["local_dir"])
    eval_blocks = held[: t.eval_batches * t.batch_size]
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    progress = _progress_callback(callback, stop, run, tokens_per_step, log)
    trainer = _trainer_class()(
        model=model, args=training_arguments(t, run, len(eval_blocks) > 0),
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks) if len(eval_blocks) else None,
        callbacks=[progress])
    trainer.embedding_learning_rate = t.embedding_learning_rate
    _quiet(trainer)
    start_step = _step_of(resume_from)
    started = time.time()
    with _CtrlC(stop, log):
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except KeyboardInterrupt:
            log("[train] aborted; saving the adapter as it is now")
            progress.stopped = True
    seconds = time.time() - started
    run.adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(run.adapter_dir))
    tokenizer.save_pretrained(str(run.adapter_dir))
    return _record(settings, t, run, trainer, progress, backend, start_step, seconds, tokens_per_step, callback)


def _quiet(trainer: Any) -> None:
    """Drop the Trainer's own printing: rawtune's progress callback reports instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


def _step_of(checkpoint: Optional[Path]) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


def _record(settings: RunSettings, t: TrainSettings, run: RunDir, trainer: Any, progress: Any,
            backend: str, start_step: int, seconds: float, tokens_per_step: int,
            callback: Optional[Callback]) -> dict:
    state = trainer.state
    steps_now = state.global_step - start_step
    tokens = steps_now * tokens_per_step
    losses = [e["loss"] for e in progress.history if e["type"] == "step"]
    previous = run.load().get("train", {}).get("history", []) if start_step else []
    record = {
        "backend": backend, "steps": state.global_step, "max_steps": state.max_steps,
        "resumed_from_step": start_step, "stopped_early": progress.stopped,
        "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 2),
        "history": [e for e in previous if e["step"] <= start_step] + progress.history,
        "adapter": run.adapter_dir.name, "effective_settings": dataclasses.asdict(t),
    }
    metrics = run.load().get("metrics", {})
    metrics.update(train_tokens=tokens, train_seconds=round(seconds, 2),
                   train_tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None)
    run.update(train=record, metrics=metrics, versions=versions(backend))
    if callback:
        callback({"type": "done", **{k: record[k] for k in ("steps", "max_steps", "stopped_early", "final_loss")}})
    return record
