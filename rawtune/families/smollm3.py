"""SmolLM3: Llama's layer without RoPE on every 4th layer (NoPE), Llama 3's tokenizer.

llama.cpp's ``smollm3`` leaves RoPE out of every 4th layer exactly; other layouts are refused.
Q/K are permuted per head like Llama. Chat: ChatML with a thinking switch (``<|im_end|>``).
"""

from __future__ import annotations

from ..errors import ExportError
from .base import Config, Family, Gguf, KnownModel, Shape, Template, Training
from .hooks import no_sliding_window
from .llama import fast_loop_check


def check(config: Config, shape: Shape) -> None:
    """llama.cpp's smollm3 skips RoPE on every 4th layer, the published models' layout; anything else differs."""
    no_sliding_window(config, shape)
    want = [int((i + 1) % 4 != 0) for i in range(shape.n_layer)]
    have = config.get("no_rope_layers")
    if have is None:  # transformers derives the list from the interval
        every = int(config.get("no_rope_layer_interval") or 4)
        have = [int((i + 1) % every != 0) for i in range(shape.n_layer)]
    if [int(x) for x in have] != want:
        raise ExportError(f"SmolLM3 layers without RoPE are {have}; llama.cpp's smollm3 leaves out RoPE on every "
                          f"4th layer only ({want}), so this checkpoint would run differently")


FAMILY = Family(
    name="smollm3",
    label="SmolLM3",
    hf_architectures=("SmolLM3ForCausalLM",),
    model_types=("smollm3",),
    order=80,
    tokenizer="byte-level BPE (Llama 3)",
    gguf=Gguf("SMOLLM3", permute_qk=True, check=check),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    template=Template(end_of_turn=("<|im_end|>",)),
    models=(
        KnownModel("HuggingFaceTB/SmolLM3-3B-Base", 3.08e9),
        KnownModel("HuggingFaceTB/SmolLM3-3B", 3.08e9, instruct=True),
    ),
)
