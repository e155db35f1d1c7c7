"""OLMo 2: RMSNorm after attention and MLP instead of before, RMSNorm over all of q and k.

llama.cpp's ``olmo2`` has no pre-norms, runs no sliding window (refused when switched on) and
its loader requires ``output.weight`` even for a tied checkpoint: export writes the tied
embedding as the output matrix too. Tokenizer: cl100k, which applies its merges to whole words
(llama.cpp's "dbrx", not "llama-bpe").
"""

from __future__ import annotations

from .base import Embeddings, Family, Gguf, KnownModel, Training
from .hooks import no_sliding_window
from .llama import fast_loop_check

# The Llama 3 split, for tokenizers that apply their merges even to words found whole in the vocabulary
# (tokenizer.json's ignore_merges false): llama.cpp's "llama-bpe" takes such words whole, its "dbrx"
# (the cl100k split OLMo 2 uses) applies the merges, as HF does.
MERGES_APPLIED = {"llama-bpe": "dbrx"}

FAMILY = Family(
    name="olmo2",
    label="OLMo 2",
    hf_architectures=("Olmo2ForCausalLM",),
    model_types=("olmo2",),
    order=100,
    tokenizer="byte-level BPE (cl100k)",
    gguf=Gguf("OLMO2", check=no_sliding_window,
              blocks=("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM",
                      "FFN_GATE", "FFN_UP", "FFN_DOWN", "FFN_POST_NORM")),
    embeddings=Embeddings(output_when_tied=True),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    models=(
        KnownModel("allenai/OLMo-2-0425-1B", 1.48e9),
        KnownModel("allenai/OLMo-2-0425-1B-Instruct", 1.48e9, instruct=True),
    ),
    notes="a tied checkpoint is written with `output.weight` (llama.cpp's loader requires it)",
)
