"""Where the compiled fast loop may run, and the model-size arithmetic that decides it.

Both the memory planner (:mod:`.plan`) and the fast loop's own check
(:func:`.fast_loop.why_not_for_settings`) ask these rules, so they live below both: ZeroGPU
never compiles (Hugging Face's ZeroGPU docs rule ``torch.compile`` out there), and models above
the size where the fast loop was measured faster stay on the Trainer path.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from .. import env
from ..errors import ConfigError
from ..settings import TrainSettings

# The fast loop earns its memory at 135M: 1.60x Unsloth's best (279,506 vs 174,685 tok/s) and, held to
# 16 GiB, 4x4 at 9.2 GiB ran 108k-134k tok/s against Unsloth 8x2's 102k at 8.4 GiB. At the 1B shape it
# was 1.04x (86,715 vs 83,384) for 1.7x the memory (64.1 vs 37.3 GiB), so it is planned only up to
# this size; between the two shapes nothing was measured.
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
    import json

    if c.get("architectures") and _buildable(c):
        counted = _meta_split(json.dumps(c, sort_keys=True))
        if counted is not None:
            return counted
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


@functools.lru_cache(maxsize=16)
def _meta_split(config_json: str) -> Optional[tuple[int, int]]:
    """The split counted on the model built from config.json on the meta device (no memory used);
    None when transformers cannot build it."""
    import json

    try:
        import torch
        import transformers

        values = json.loads(config_json)
        config = transformers.AutoConfig.for_model(**values)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this transformers does not know, or a config it rejects
        return None
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    total = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    return linear, total - linear


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


def fast_loop_veto(t: TrainSettings, c: dict) -> Optional[str]:
    """Why the plan keeps the fast loop out although it could run (None when it may run)."""
    if zero_gpu():
        return "ZeroGPU: no torch.compile there, and the fast loop is measured only compiled"
    if c and "hidden_size" in c and param_count(c) > FAST_LOOP_MAX_PARAMS:
        return (f"{param_count(c) / 1e9:.1f}B parameters: the fast loop measured 1.04x Unsloth at a 1B shape "
                f"for 1.7x the memory")
    return None
