"""Each family's real chat template, translated to Go and rendered by Go's own text/template.

The templates are copies of the model repositories' chat templates (tests/data/templates, with
their sources in SOURCES.md); the tokenizers are the tiny family tokenizers of tests/families.py,
so special tokens, BOS and EOS are where the family has them. For every template the Go template
must render the sample conversations (one user turn; a system prompt; several turns; a final
assistant turn) exactly as the Jinja template does, and ``params`` must stop on the family's
end-of-turn tokens.
"""

from __future__ import annotations

import json

import pytest

from families import FAMILIES, STAND_IN_TEMPLATES, TEMPLATE_DIR, TEMPLATE_FILES, build_tokenizer
from rawtune.export import ollama
from test_ollama import assert_go_matches_jinja, go_render

# Families whose tests use a stand-in template written in the family's turn format (tests/families.py
# says why for each): the real one could not be fetched here, or rawtune does not translate it.
STAND_IN = {"mistral", "olmo3", "exaone4", "gemma4"}
# Templates of other members of a family, rendered with that family's tokenizer.
EXTRA = {"phi4": "phi3", "granite4": "granite", "smollm2": "qwen2", "lfm25": "lfm2"}
TEMPLATES = FAMILIES + list(EXTRA)

# Stops written to params: the token that ends an assistant turn first, then the turn starters, then EOS.
STOPS = {
    "llama3": ["<|eot_id|>", "<|start_header_id|>"],
    "mistral": ["</s>"],
    "qwen2": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|im_start|>"],
    "gemma2": ["<end_of_turn>", "<start_of_turn>", "<eos>"],
    "gemma3": ["<end_of_turn>", "<start_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>"],
    "phi4": ["<|end|>", "<|user|>", "<|assistant|>"],
    "smollm2": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    "smollm3": ["<|im_end|>", "<|im_start|>"],
    "granite": ["<|end_of_text|>", "<|start_of_role|>"],
    "granite4": ["<|end_of_text|>", "<|start_of_role|>"],
    "olmo2": ["<|endoftext|>", "<|user|>", "<|assistant|>"],
    "lfm2": ["<|im_end|>", "<|im_start|>"],
    "lfm25": ["<|im_end|>", "<|im_start|>"],
    "qwen35": ["<|im_end|>", "<|im_start|>"],
    "granitehybrid": ["<|end_of_text|>", "<|start_of_role|>"],
    "gptoss": ["<|end|>", "<|start|>", "<|return|>"],
    "olmo3": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    "exaone4": ["[|endofturn|]", "[|user|]", "[|assistant|]"],
    "gemma4": ["<turn|>", "<|turn>"],
}
# What the family's first sample conversation (one user turn) must end with in Go: its generation prompt.
GENERATION = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "mistral": " [/INST]",
    "gemma2": "<start_of_turn>model\n", "gemma3": "<start_of_turn>model\n",
    "phi3": "<|end|>\n<|assistant|>\n", "phi4": "<|end|><|assistant|>",
    "granite": "<|start_of_role|>assistant<|end_of_role|>", "granite4": "<|start_of_role|>assistant<|end_of_role|>",
    "olmo2": "\n<|assistant|>\n", "granitehybrid": "<|start_of_role|>assistant<|end_of_role|>",
    "gptoss": "<|end|><|start|>assistant",
    "qwen35": "<|im_end|>\n<|im_start|>assistant\n<think>\n",  # thinking on: the template's default
    "exaone4": "[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\n",
    "gemma4": "<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
}
CHATML_GENERATION = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One tiny tokenizer per template (built on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            base = EXTRA.get(name, name)
            tok = build_tokenizer(base, tmp_path_factory.mktemp(name))
            if name in EXTRA:
                tok.chat_template = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
            cache[name] = tok
        return cache[name]
    return get


def translated(tok):
    lines = []
    add_bos = bool(getattr(tok, "add_bos_token", False))
    fmt = ollama.chat_format_for(tok, add_bos, log=lines.append)
    assert fmt is not None, lines
    assert not any("WARNING" in line for line in lines), lines
    return fmt, add_bos


@pytest.mark.parametrize("name", TEMPLATES)
def test_family_template_renders_the_same_in_go(name, tokenizers, tmp_path):
    tok = tokenizers(name)
    if name in FAMILIES and name not in STAND_IN and name not in STAND_IN_TEMPLATES:
        # The real template from the model repo, not a stand-in.
        assert tok.chat_template == (TEMPLATE_DIR / f"{TEMPLATE_FILES.get(name, name)}.jinja").read_text(encoding="utf-8")
    fmt, add_bos = translated(tok)
    texts = assert_go_matches_jinja(ollama.tokenizer_renderer(tok), fmt,
                                    strip_bos=tok.bos_token if add_bos and tok.bos_token else "")
    assert len(texts) == 5  # no system; system; multi-turn; final assistant turn; system + multi-turn
    assert texts[0].endswith(GENERATION.get(name, CHATML_GENERATION)), texts[0]
    assert "What is 2+2?" in texts[1] and "You answer briefly." in texts[1]
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    info = ollama.write_files(tmp_path, "m.Q4_K_M.gguf", fmt, tok.eos_token, specials, context_length=8192)
    assert json.loads((tmp_path / "params").read_text())["stop"] == STOPS[name] == info["stop"]
    assert (tmp_path / "template").read_text() == ollama.to_go_template(fmt)


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(tokenizers):
    for name in ("gemma2", "gemma3"):
        fmt, _ = translated(tokenizers(name))
        assert fmt.fold_system == "\n\n" and fmt.system_refused == (name == "gemma2")
        out = go_render(ollama.to_go_template(fmt), [{"Messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]}])[0]
        assert out == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                       "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"), out


def test_qwen3_final_assistant_turn_gets_the_empty_think_block(tokenizers):
    fmt, _ = translated(tokenizers("qwen3"))
    assert fmt.last_assistant == ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_end|>\n")
    out = go_render(ollama.to_go_template(fmt), [{"Messages": [
        {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
        {"role": "assistant", "content": "D"}]}])[0]
    # Earlier turns plain, the last one with the think block, as the Jinja template writes them.
    assert out == ("<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\n\n</think>\n\nD<|im_end|>\n")


def test_phi_trailing_eos_is_not_rendered(tokenizers):
    tok = tokenizers("phi3")
    fmt, _ = translated(tok)
    assert fmt.closing == tok.eos_token
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    jinja = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    go = go_render(ollama.to_go_template(fmt), [{"Messages": messages}])[0]
    assert jinja == go + tok.eos_token


def test_a_wrong_translation_is_caught(tokenizers):
    """Negative control: the Go-vs-Jinja comparison fails when the translation is off."""
    tok = tokenizers("gemma3")
    fmt, add_bos = translated(tok)
    fmt.fold_system = None  # a system prompt as its own turn: not what Gemma writes
    fmt.prefix["system"] = "<start_of_turn>system\n"
    fmt.suffix["system"] = "<end_of_turn>\n"
    with pytest.raises(AssertionError):
        assert_go_matches_jinja(ollama.tokenizer_renderer(tok), fmt, strip_bos=tok.bos_token)
    with pytest.raises(ollama.TemplateUnsupported):
        ollama.check_format(fmt, ollama.tokenizer_renderer(tok), tok.bos_token, add_bos)
