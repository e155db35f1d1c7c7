"""Compare: the base model and the tuned model answer the same prompt, streamed side by side.

Both sides get the same prompt text, seed and sampling settings. The base is the run's resolved
base model (PyTorch); the tuned side is either PyTorch (``merged/`` when it is current, else the
base with ``adapter/`` applied by PEFT) or an exported GGUF from ``gguf/`` run by llama.cpp, which
is what Ollama will serve. "completion" mode continues the prompt as plain text (the natural use
of a model trained on raw text); "chat" mode wraps it in the tokenizer's chat template.

Generation is a manual token loop on each side and the two loops advance in turn, so the page
shows both answers growing together without threads. Nothing is written to the run directory.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import families
from .errors import ConfigError, ModelError, StageMissing
from .quants import label_of_file, sort_key
from .rundir import RunDir

MODES = ("completion", "chat")
# Loaded models are kept for the next prompt; a few at most, since each costs memory.
_CACHE_SIZE = 3
_cache: "OrderedDict[tuple, Any]" = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class Sampling:
    """The generation settings both sides share."""

    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.7  # 0 means greedy (always the most likely token)
    top_p: float = 0.9  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int = 0  # random seed, the same on both sides

    def check(self) -> "Sampling":
        if not 1 <= int(self.max_new_tokens) <= 4096:
            raise ConfigError("max new tokens must be between 1 and 4096")
        if not 0 <= float(self.temperature) <= 5:
            raise ConfigError("temperature must be between 0 (greedy) and 5")
        if not 0 < float(self.top_p) <= 1:
            raise ConfigError("top-p must be in (0, 1], e.g. 0.9")
        return self


# ---------------------------------------------------------------- what a run offers


def gguf_files(run: RunDir) -> dict[str, Path]:
    """Exported GGUFs by quant label (Q4_K_M, Q8_0, F16), from run.json or the folder itself."""
    found: dict[str, Path] = {}
    for label, info in (run.load().get("gguf") or {}).items():
        path = run.gguf_dir / Path(str(info.get("file", ""))).name
        if path.is_file():
            found[label.upper()] = path
    if run.gguf_dir.is_dir():
        for path in sorted(run.gguf_dir.glob("*.gguf")):
            label = label_of_file(path.name) or path.name[: -len(".gguf")].rsplit(".", 1)[-1].upper()
            found.setdefault(label, path)
    return found


def tuned_choices(run_dir: str | Path) -> list[str]:
    """What the tuned side can be for this run: ``pytorch`` and ``gguf:<QUANT>`` per exported file."""
    run = RunDir(run_dir)
    choices = ["pytorch"] if run.has_adapter() else []
    labels = sorted(gguf_files(run), key=lambda q: (sort_key(q), q))
    return choices + [f"gguf:{q}" for q in labels]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, prompt: str, mode: str) -> str:
    """The exact text both models see: the prompt itself, or the chat template around it."""
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; use completion or chat")
    if not prompt or not prompt.strip():
        raise ConfigError("the prompt is empty: type some text to continue (or a question in chat mode)")
    if mode == "completion":
        return prompt
    if not has_chat_template(tokenizer):
        raise ConfigError(
            "chat mode needs a chat template, but this base model's tokenizer has none (a raw base "
            "model such as SmolLM2-135M); use completion mode, or train from an -Instruct model"
        )
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# ---------------------------------------------------------------- loading (cached)


def _cached(key: tuple, load: Callable[[], Any]) -> Any:
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value = load()
    with _cache_lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _stamp(path: Path) -> tuple:
    """Changes when the files in ``path`` change, so a retrained adapter is reloaded."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _load_torch(local_dir: str) -> Any:
    from .models import load_causal_lm

    model = load_causal_lm(local_dir)
    model.eval()
    return model


def load_base(run: RunDir) -> tuple[Any, Any]:
    """The base model and its tokenizer, as recorded in run.json."""
    from .models import load_tokenizer

    local = str(run.require("model", "train")["local_dir"])
    if not Path(local).is_dir():
        raise ModelError(f"the base model folder {local} is gone; rerun training so it is fetched again")
    key = ("base", local, _stamp(Path(local)))
    return _cached(key, lambda: (_load_torch(local), load_tokenizer(local)))


def load_tuned_torch(run: RunDir) -> Any:
    """The tuned model in PyTorch: merged/ when it matches the adapter, else base + adapter."""
    from .merge import is_current
    from .models import load_tuned

    if not run.has_adapter():
        raise StageMissing(f"{run.adapter_dir} has no adapter yet: train first (Stop also keeps one)")
    if run.merged_dir.is_dir() and is_current(run):
        key = ("merged", str(run.merged_dir.resolve()), _stamp(run.merged_dir))
        return _cached(key, lambda: _load_torch(str(run.merged_dir)))
    key = ("adapter", str(run.adapter_dir.resolve()), _stamp(run.adapter_dir))
    return _cached(key, lambda: load_tuned(run))


def load_gguf(path: Path, n_ctx: int) -> Any:
    """A llama.cpp model for one GGUF file, cached like the PyTorch models."""
    from .export.llama import load_llama

    return _cached(("gguf", str(path.resolve()), _stamp(path), n_ctx), lambda: load_llama(path, n_ctx, gpu=True))


# ---------------------------------------------------------------- generation


def stop_ids(tokenizer: Any, model: Any, mode: str) -> set[int]:
    """Token ids that end an answer: EOS (from the tokenizer and the generation config), plus
    the end-of-turn token of the chat template in chat mode."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if mode == "chat":
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in families.end_of_turn_tokens() if t in vocab)
    return ids


def sample_next(logits: Any, sampling: Sampling, generator: Any) -> int:
    """Pick the next token: greedy at temperature 0, else temperature + top-p sampling."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Drop a token when the tokens before it already cover top_p (the first one always stays).
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p > sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs / probs.sum()
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator))


def _encode(tokenizer: Any, text: str, mode: str) -> list[int]:
    """Token ids of the prompt, with BOS exactly as the data stage adds it for completion."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if mode == "completion" and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos] + ids
    return ids


def _context_limit(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


def stream_torch(model: Any, tokenizer: Any, text: str, mode: str, sampling: Sampling) -> Iterator[str]:
    """Generate token by token with the KV cache; yield the whole answer so far at each step."""
    import torch

    device = next(model.parameters()).device
    ids = _encode(tokenizer, text, mode)
    room = _context_limit(model) - sampling.max_new_tokens
    if room < 1:
        raise ConfigError(f"max new tokens {sampling.max_new_tokens} leaves no room for the prompt in "
                          f"this model's context of {_context_limit(model)} tokens; lower it")
    ids = ids[-room:]
    stops = stop_ids(tokenizer, model, mode)
    generator = torch.Generator(device=device).manual_seed(int(sampling.seed))
    out: list[int] = []
    shown = ""
    # Each forward pass gets its own no_grad block: a grad-mode context held open across a
    # `yield` would leak into the caller's thread (and silently break training there).
    with torch.no_grad():
        result = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    for _ in range(sampling.max_new_tokens):
        token = sample_next(result.logits[0, -1], sampling, generator)
        if token in stops:
            break
        out.append(token)
        answer = tokenizer.decode(out, skip_special_tokens=True)
        # A multi-byte character split across tokens decodes to U+FFFD until it is complete.
        if answer != shown and not answer.endswith("\ufffd"):
            shown = answer
            yield shown
        with torch.no_grad():
            result = model(input_ids=torch.tensor([[token]], device=device),
                           past_key_values=result.past_key_values, use_cache=True)
    final = tokenizer.decode(out, skip_special_tokens=True)
    if final != shown:
        yield final


def stream_gguf(llm: Any, text: str, mode: str, sampling: Sampling) -> Iterator[str]:
    """Generate with llama.cpp from the same prompt text; yield the whole answer so far."""
    # special=True parses <|im_start|>-style markers as the single tokens the template means;
    # BOS follows the GGUF's own add_bos flag in completion mode (the chat template writes its own).
    ids = llm.tokenize(text.encode("utf-8"), add_bos=(mode == "completion"), special=True)
    room = llm.n_ctx() - sampling.max_new_tokens
    ids = ids[-max(room, 1):]
    shown = ""
    stream = llm.create_completion(
        prompt=ids, max_tokens=sampling.max_new_tokens, temperature=float(sampling.temperature),
        top_p=float(sampling.top_p), top_k=0, min_p=0.0, repeat_penalty=1.0,
        seed=int(sampling.seed), stream=True,
        stop=list(families.end_of_turn_tokens()) if mode == "chat" else None)
    for chunk in stream:
        shown += chunk["choices"][0].get("text", "")
        yield shown


def _gguf_context(run: RunDir, sampling: Sampling) -> int:
    seq = (run.load().get("settings") or {}).get("train", {}).get("seq_len") or 512
    return int(max(512, min(4096, int(seq) + sampling.max_new_tokens)))


def _interleave(left: Iterator[str], right: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Advance both streams one step at a time; yield both texts whenever either changes."""
    a = b = ""
    live = {"a": left, "b": right}
    while live:
        for name in ("a", "b"):
            if name not in live:
                continue
            try:
                value = next(live[name])
            except StopIteration:
                del live[name]
                continue
            if name == "a":
                a = value
            else:
                b = value
            yield a, b


def stream_compare(run_dir: str | Path, prompt: str, mode: str = "completion",
                   max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
                   seed: int = 0, tuned_kind: str = "pytorch") -> Iterator[tuple[str, str]]:
    """Stream ``(base_answer, tuned_answer)`` pairs for one prompt, both growing token by token.

    ``tuned_kind`` is ``pytorch`` or ``gguf:<QUANT>`` (``gguf`` alone takes Q4_K_M when present,
    the quant Ollama pulls by default); :func:`tuned_choices` lists what a run offers.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise StageMissing(f"{run.path} is not a run directory yet: prepare data and train first")
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p), int(seed)).check()
    base, tokenizer = load_base(run)
    text = build_prompt(tokenizer, prompt, mode)
    kind = (tuned_kind or "pytorch").strip()
    if kind == "pytorch":
        tuned_stream = stream_torch(load_tuned_torch(run), tokenizer, text, mode, sampling)
    elif re.fullmatch(r"(?i)gguf(:[a-z0-9_]+)?", kind):
        files = gguf_files(run)
        if not files:
            raise StageMissing(f"{run.gguf_dir} has no GGUF yet: export first (Export & Push tab or `rawtune export`)")
        quant = kind.split(":", 1)[1].upper() if ":" in kind else ("Q4_K_M" if "Q4_K_M" in files else sorted(files)[0])
        if quant not in files:
            raise StageMissing(f"no {quant} GGUF in {run.gguf_dir}; exported: {', '.join(sorted(files))}")
        tuned_stream = stream_gguf(load_gguf(files[quant], _gguf_context(run, sampling)), text, mode, sampling)
    else:
        raise ConfigError(f"tuned model {tuned_kind!r} is unknown; use pytorch or gguf:Q4_K_M / gguf:Q8_0 / gguf:F16")
    yield from _interleave(stream_torch(base, tokenizer, text, mode, sampling), tuned_stream)


def compare(run_dir: str | Path, prompt: str, **kwargs: Any) -> tuple[str, str]:
    """Both final answers at once (the last pair of :func:`stream_compare`)."""
    last = ("", "")
    for last in stream_compare(run_dir, prompt, **kwargs):
        pass
    return last
