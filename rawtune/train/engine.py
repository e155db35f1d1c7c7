"""Where the compiled fast loop may run, and the model-size arithmetic that decides it.

Both the memory planner (:mod:`.plan`) and the fast loop's own check
(:func:`.fast_loop.why_not_for_settings`) ask these rules, so they live below both: ZeroGPU
never compiles (Hugging Face's ZeroGPU docs rule ``torch.compile`` out there), and models above
the size where the fast loop was measured faster stay on the Trainer path.
"""

from __future__ import annotations

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


def linear_params(c: dict) -> int:
    d, inter, layers, _, q, kv = dims(c)
    return layers * (d * (q + 2 * kv) + q * d + 3 * d * inter)


def param_count(c: dict) -> int:
    """Parameters of the model (norms and biases left out)."""
    d, _, _, vocab, _, _ = dims(c)
    return linear_params(c) + vocab * d * (1 if c.get("tie_word_embeddings") else 2)


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
