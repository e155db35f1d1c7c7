"""Where the compiled fast loop may run, and the model-size arithmetic that decides it.

Both the memory planner (:mod:`.plan`) and the fast loop's own check
(:func:`.fast_loop.why_not_for_settings`) ask these rules, so they live below both: ZeroGPU
never compiles (Hugging Face's ZeroGPU docs rule ``torch.compile`` out there), and models above
the size where the fast loop was measured faster stay on the Trainer path.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from .. import env
from ..errors import ConfigError
from ..settings import TrainSettings

# The fast loop earns its memory at 135M: 1.60x Unsloth's best (279,506 vs 174,685 tok/s) and, held to
# 16 GiB, 4x4 at 9.2 GiB ran 108k-134k tok/s against Unsloth 8x2's 102k at 8.4 GiB. At the 1B shape it
# was 1.04x (86,715 vs 83,384) for 1.7x the memory (64.1 vs 37.3 GiB), so where Unsloth is the
# alternative it is planned only up to this size; between the two shapes nothing was measured. Where
# PEFT's Trainer is the alternative there is no size limit: at the 1B shape on an H100 the fast loop
# ran 85,344 tok/s (8 x 2, 35.2 GiB) and PEFT's Trainer, under a 24 GiB cap, 30,416 (4 x 4 with
# checkpointing, 10.0 GiB; 2026-12-08), and only the fast loop holds FP8 base weights.
FAST_LOOP_MAX_PARAMS = 500_000_000


def dims(c: dict) -> tuple:
    """(hidden, intermediate, layers, vocab, q width, k/v width) from a config."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    return d, c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], heads * hd, c.get("num_key_value_heads", heads) * hd


def dense_linear_params(c: dict) -> int:
    """The decoder's matrices as if every layer were dense attention plus a gated MLP."""
    d, inter, layers, _, q, kv = dims(c)
    return layers * (d * (q + 2 * kv) + q * d + 3 * d * inter)


def weight_split(c: dict) -> tuple[int, int]:
    """(parameters of the decoder's ``nn.Linear`` layers, every other parameter).

    The first part is what 4-bit loading quantizes; the rest (embeddings, per-layer embeddings,
    stacked expert tensors, convolution and Mamba parameters, norms) stays in bf16. For a real
    config.json the split is counted on the model built on the meta device, because the dense
    formula misses mixture-of-experts weights, Gemma 4's per-layer embeddings and the hybrid
    layers; for a planner shape (no ``architectures``) and for anything transformers cannot build,
    it is the dense formula, raised to the model card's count where the family gives one."""
    counts = meta_counts(c)
    if counts is not None:
        return counts.linear, counts.other
    d, _, _, vocab, _, _ = dims(c)
    linear = dense_linear_params(c)
    other = vocab * d * (1 if c.get("tie_word_embeddings") else 2)
    from ..families import CARD_PARAMS

    card = c.get(CARD_PARAMS)
    return linear, max(other, int(card) - linear) if card else other


# Building a model on the meta device costs no tensor memory, but each layer and expert is a Python
# module: a config.json from the Hub that claims a million layers or experts must not get that far.
MAX_META_MODULES = 50_000


def _buildable(c: dict) -> bool:
    """Whether the meta-device count may run for this config (layers x experts within bounds)."""
    try:
        layers = int(c.get("num_hidden_layers") or 0)
        experts = max(int(c.get(k) or 0) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    except (TypeError, ValueError):
        return False
    return 0 < layers and layers * max(1, experts) <= MAX_META_MODULES


@dataclass(frozen=True)
class MetaCounts:
    """What the planner needs from a model built on the meta device."""

    linear: int  # parameters of the decoder's nn.Linear layers (lm_head left out)
    other: int  # every other parameter (a tied head counted once)
    names: frozenset  # the last name component of every module (what LoRA targets are matched on)
    sides: dict  # leaf name -> sum of in_features + out_features over the decoder's Linear layers of that name
    stacked: dict  # parameter name -> (count, experts, in, out) for the 3-D expert tensors


@functools.lru_cache(maxsize=16)
def _meta_counts(config_json: str) -> Optional[MetaCounts]:
    """:class:`MetaCounts` of the model built from config.json on the meta device (no memory used);
    None when transformers cannot build it."""
    import json

    try:
        import torch
        import transformers

        values = _special_floats(json.loads(config_json))
        config = transformers.AutoConfig.for_model(**values)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this transformers does not know, or a config it rejects
        return None
    linear, sides = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            linear += module.weight.numel()
            leaf = name.rsplit(".", 1)[-1]
            sides[leaf] = sides.get(leaf, 0) + module.in_features + module.out_features
    stacked: dict = {}
    for name, param in model.named_parameters():
        if param.dim() == 3:  # experts stacked in one tensor: [experts, in, out] (PEFT's target_parameters)
            key = re.sub(r"^.*?\blayers\.\d+\.", "", name)  # the same name in every layer
            count = stacked.get(key, (0,))[0] + 1
            stacked[key] = (count, *param.shape)
    total = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    names = frozenset(name.rsplit(".", 1)[-1] for name, _ in model.named_modules())
    return MetaCounts(linear, total - linear, names, sides, stacked)


def _special_floats(value: Any) -> Any:
    """config.json with transformers' spelling of the floats JSON lacks (``{"__float__": "Infinity"}``,
    e.g. Granite 4.0-H's ``time_step_limit``) turned back into floats, as from_pretrained does."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(value["__float__"].replace("Infinity", "inf"))
        return {key: _special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_special_floats(item) for item in value]
    return value


def meta_counts(c: dict) -> Optional[MetaCounts]:
    """:class:`MetaCounts` of a real config.json (one naming its ``architectures``) within the module
    bound; None for a planner shape, a config claiming too many layers or experts, or one transformers
    cannot build."""
    import json

    if not (c.get("architectures") and _buildable(c)):
        return None
    return _meta_counts(json.dumps(c, sort_keys=True))


def lora_params(t: TrainSettings, c: dict) -> Optional[int]:
    """LoRA's trainable parameters for ``t`` on the model of config ``c``, counted on the meta-built
    model with the family's own target resolution (the new layer kinds: DeltaNet, convolution, Mamba
    projections; experts through PEFT's target_parameters, r per expert on each side). None for a
    planner shape or a model transformers cannot build."""
    from .. import families

    counts = meta_counts(c)
    if counts is None:
        return None
    family = families.family_for_config(c)
    preset = getattr(t, "preset", None)
    targets = families.lora_targets(family, list(t.target_modules), set(counts.names), preset)
    total = sum(t.lora_r * counts.sides.get(name, 0) for name in targets)
    for suffix in families.lora_parameters(family, preset):
        for key, (layers, experts, fan_in, fan_out) in counts.stacked.items():
            if key == suffix or key.endswith("." + suffix):
                total += layers * t.lora_r * experts * (fan_in + fan_out)
    return total


def param_count(c: dict) -> int:
    """Parameters of the model (for a planner shape: norms and biases left out)."""
    return sum(weight_split(c))


def zero_gpu() -> bool:
    """True on a ZeroGPU Space (its SPACES_ZERO_GPU variable) or when RAWTUNE_ZERO_GPU=1 says so."""
    flags = ((env.get("RAWTUNE_ZERO_GPU") or ""), os.environ.get("SPACES_ZERO_GPU", ""))
    return any(f.lower() in ("1", "t", "true", "yes") for f in flags)


def compile_allowed() -> bool:
    """torch.compile is off on ZeroGPU (Hugging Face's ZeroGPU docs) and with RAWTUNE_COMPILE=0."""
    return not zero_gpu() and env.get("RAWTUNE_COMPILE") != "0"


# torch.compile's modes. "reduce-overhead" records each compiled layer as a CUDA graph (its forward
# and backward), so a step no longer costs the host one launch per kernel. Opt-in through
# RAWTUNE_COMPILE_MODE: on 4 H200s at 135M it took a steady step from 104.9 to 66.1 ms (2.25x to
# 3.55x one GPU), but data-parallel runs paid about 3 s more in their first steps, so a 45-step run
# was slower; one GPU gained nothing (docs/benchmarks.md).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode() -> Optional[str]:
    """torch.compile's mode for the fast loop's layer from RAWTUNE_COMPILE_MODE (None: torch's default)."""
    mode = (env.get("RAWTUNE_COMPILE_MODE") or "")
    if not mode:
        return None
    if mode not in COMPILE_MODES:
        raise ConfigError(f"RAWTUNE_COMPILE_MODE={mode!r}: use one of {', '.join(COMPILE_MODES)}, or unset it")
    return mode


def fast_loop_veto(t: TrainSettings, c: dict, unsloth: bool = True) -> Optional[str]:
    """Why the plan keeps the fast loop out although it could run (None when it may run).
    ``unsloth``: whether the alternative is Unsloth's model (else PEFT's, in the Trainer)."""
    if zero_gpu():
        return "ZeroGPU: no torch.compile there, and the fast loop is measured only compiled"
    if unsloth and c and "hidden_size" in c and param_count(c) > FAST_LOOP_MAX_PARAMS:
        return (f"{param_count(c) / 1e9:.1f}B parameters: the fast loop measured 1.04x Unsloth at a 1B shape "
                f"for 1.7x the memory")
    return None
