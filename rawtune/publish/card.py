"""The model card (README.md) rawtune pushes with a run: Hub metadata plus a page that explains itself.

The YAML header tells the Hub what the repo is (base model and relation, datasets, licence,
tags); the body says what was trained on and how, shows the held-out perplexity of the base and
the tuned model (and of each GGUF quant, with file sizes and its KL divergence from the merged
model), and gives copy-paste lines for
Ollama, llama.cpp and Python that use the real repo id. Pure: a run record in, text out (no
files, no network).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Optional

import yaml

from ..data.files import SUPPORTED
from ..hubauth import is_repo_id
from ..quants import ORDER, label_of_file, sort_key


def hub_dataset(record: dict[str, Any]) -> Optional[str]:
    """The Hub dataset id the run trained on, or None for a local corpus.

    The recorded spec is a Hub id by the one rule (:func:`rawtune.hubauth.is_repo_id`), unless
    it names a file rawtune reads (``corpus/train.jsonl`` has that shape too).
    """
    dataset = ((record.get("settings") or {}).get("data") or {}).get("dataset")
    if not is_repo_id(dataset) or PurePosixPath(str(dataset)).suffix.lower() in SUPPORTED:
        return None
    return str(dataset)


def _size(n: Optional[int]) -> str:
    if not n:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _pct(value: Any) -> str:
    return f"{value:.1f} %" if isinstance(value, (int, float)) else "n/a"


def metadata(record: dict[str, Any]) -> dict[str, Any]:
    """The YAML header of the card, built from run.json."""
    model = record.get("model") or {}
    dataset = hub_dataset(record)
    meta: dict[str, Any] = {}
    if model.get("upstream_id"):
        meta["base_model"] = model["upstream_id"]
        # The weights were trained, then exported to GGUF: to the Hub that is a fine-tune of the
        # base (its other values are adapter, merge and quantized, for untrained re-packagings).
        meta["base_model_relation"] = "finetune"
    if dataset:
        meta["datasets"] = [dataset]
    if model.get("license"):
        meta["license"] = str(model["license"])
    # The Hub knows no "gguf" library (it detects GGUF files by itself and offers Ollama/llama.cpp
    # from them); llama-cpp-python is a listed library whose snippet loads a root GGUF, as here.
    meta["library_name"] = "llama-cpp-python"
    tags = ["gguf", "ollama", "rawtune"]
    if (record.get("train") or {}).get("backend") == "unsloth":
        tags.append("unsloth")
    tags += ["lora", "text-generation"]
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    return meta


def _gguf_rows(record: dict[str, Any], files: list[str]) -> list[tuple[str, str, Optional[int], dict]]:
    """(quant, file, bytes, run.json entry) for each GGUF, from run.json's ``gguf`` and the pushed files."""
    rows = []
    gguf = record.get("gguf") or {}
    for key, info in gguf.items():
        if isinstance(info, dict) and info.get("file"):
            rows.append(((label_of_file(info["file"]) or key).upper(), info["file"].split("/")[-1],
                         info.get("bytes"), info))
    known = {r[1] for r in rows}
    for name in files:
        if name.endswith(".gguf") and "/" not in name and name not in known:
            rows.append((label_of_file(name) or name, name, None, {}))
    return sorted(rows, key=lambda r: (sort_key(r[0]), r[1]))


def _calibration_lines(record: dict[str, Any]) -> list[str]:
    """Which files were quantized with an importance matrix, from how many tokens of what."""
    info = (record.get("export") or {}).get("imatrix") or {}
    entries = {label: entry for label, entry in (record.get("gguf") or {}).items() if isinstance(entry, dict)}
    weighted = [label for label, entry in entries.items() if entry.get("imatrix_tokens")]
    plain = [label for label, entry in entries.items() if (entry.get("imatrix_check") or {}).get("kept") == "plain"]
    lines = []
    if info and weighted:
        lines += ["", f"{', '.join(sorted(weighted, key=sort_key))} {'was' if len(weighted) == 1 else 'were'} "
                      f"quantized with an importance matrix "
                      f"computed from {info.get('tokens', 0):,} tokens of the training text ({info.get('blocks')} "
                      f"training blocks), so the rounding favours the weights this text uses most."]
        if any(entries[label].get("compensated_tensors") for label in weighted):
            lines[-1] += (" The tensors were rounded one group of columns at a time, each group's error "
                          "compensated in the columns after it (GPTQ-style), on the same tokens.")
    if info and plain:
        lines += ["", f"{', '.join(sorted(plain, key=sort_key))} {'is' if len(plain) == 1 else 'are'} llama.cpp's "
                      f"plain quantization: an importance "
                      f"matrix from the training text was tried and scored worse on other training blocks."]
    return lines


def _training_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    settings = record.get("settings") or {}
    data_s = settings.get("data") or {}
    train_s = settings.get("train") or {}
    train = record.get("train") or {}
    data = record.get("data") or {}
    model = record.get("model") or {}
    dataset = hub_dataset(record)
    source = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else "a local corpus"
    if dataset and data_s.get("dataset_config"):
        source += f", config `{data_s['dataset_config']}`"
    if dataset:
        source += f", split `{data_s.get('split', 'train')}`"
    rows = [
        ("base model", f"`{model.get('upstream_id') or model.get('spec') or train_s.get('model')}`"),
        ("data", source),
    ]
    if data:
        rows.append(("documents", f"{data.get('documents_kept', '?')} kept of {data.get('documents_read', '?')} read "
                                  f"(column `{data.get('column') or 'plain text'}`)"))
        rows.append(("tokens", f"{data.get('train_tokens', 0):,} train, {data.get('heldout_tokens', 0):,} held out "
                               f"(blocks of {data.get('seq_len', train_s.get('seq_len'))})"))
    backend = train.get("backend") or train_s.get("backend", "peft")
    schedule = f"{train_s.get('lr_scheduler')}, warmup {train_s.get('warmup_ratio')}"
    rows += [
        ("method", f"LoRA (continued pretraining on raw text) with {backend}"),
        ("preset", str(train_s.get("preset", "?"))),
        ("LoRA", f"r={train_s.get('lora_r')}, alpha={train_s.get('lora_alpha')}, rsLoRA={train_s.get('use_rslora')}, "
                 f"dropout={train_s.get('lora_dropout')}"),
        ("target modules", ", ".join(train_s.get("target_modules") or []) or "?"),
        ("embeddings trained", str(bool(train_s.get("train_embeddings")))),
        ("learning rate", f"{train_s.get('learning_rate')} ({schedule})"),
        ("batch", f"{train_s.get('batch_size')} x {train_s.get('grad_accum')} accumulation"),
        ("steps", f"{train.get('steps', '?')} of {train.get('max_steps', '?')}"
                  + (" (stopped early)" if train.get("stopped_early") else "")),
    ]
    if train.get("final_loss") is not None:
        rows.append(("final train loss", _num(train["final_loss"], 4)))
    if train.get("seconds") is not None:
        rows.append(("training time", f"{train['seconds'] / 60:.1f} min"))
    return rows


def render(record: dict[str, Any], repo_id: str, files: list[str]) -> str:
    """The whole README.md for ``repo_id`` holding ``files`` (paths in the repo)."""
    meta = metadata(record)
    name = repo_id.split("/", 1)[1]
    base = meta.get("base_model")
    gguf_rows = _gguf_rows(record, files)
    quants = [q for q, *_ in gguf_rows if q in ORDER]
    metrics = record.get("metrics") or {}
    dataset = meta.get("datasets", [None])[0]
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", ""]
    intro = f"A fine-tune of [{base}](https://huggingface.co/{base})" if base else "A fine-tuned language model"
    intro += f" on [{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else " on a raw-text corpus"
    intro += (", trained with rawtune (LoRA on raw text) and exported to "
              "GGUF for Ollama and llama.cpp.")
    if "template" in files and "params" in files:
        intro += " The chat template and stop tokens ship with it (`template`, `params`), so Ollama needs no Modelfile."
    out += [intro, "", "## Use it", ""]
    if quants:
        out += ["With [Ollama](https://ollama.com):", "", "```sh"]
        out += [f"ollama run hf.co/{repo_id}:{q}" for q in quants]
        out += ["```", ""]
        first = quants[0]
        out += ["With llama.cpp:", "", "```sh", f'llama-cli -hf {repo_id}:{first} -p "Once upon a time"', "```", ""]
        out += ["With Python (llama-cpp-python):", "", "```python",
                "from llama_cpp import Llama", "",
                f'llm = Llama.from_pretrained(repo_id="{repo_id}", filename="*{first}.gguf")',
                'print(llm("Once upon a time", max_tokens=64)["choices"][0]["text"])', "```", ""]
    if base and any(f.startswith("adapter/") for f in files):
        out += ["The LoRA adapter is in `adapter/`, for use with transformers and peft:", "", "```python",
                "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="adapter")',
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", ""]
    blocks = metrics.get("ppl_blocks") or (record.get("export") or {}).get("ppl_blocks")
    scored = f" ({blocks[0] * blocks[1]:,} tokens)" if blocks else ""
    out += ["## Evaluation", "",
            f"Perplexity on held-out documents that were never trained on{scored}, the same tokens for every "
            f"row (lower is better).", "",
            "| model | held-out perplexity |", "|---|---|",
            f"| base | {_num(metrics.get('ppl_base'))} |", f"| tuned | {_num(metrics.get('ppl_tuned'))} |"]
    if gguf_rows:
        out += ["", "| GGUF | quant | size | held-out perplexity | KL divergence, mean | KLD, 99th percentile "
                    "| same top token |", "|---|---|---|---|---|---|---|"]
        out += [f"| `{file}` | {q} | {_size(size)} | {_num(info.get('ppl'))} | {_num(info.get('kld_mean'), 4)} "
                f"| {_num(info.get('kld_p99'), 4)} | {_pct(info.get('same_top_pct'))} |"
                for q, file, size, info in gguf_rows]
        if any(info.get("kld_mean") is not None for *_, info in gguf_rows):
            out += ["", "KL divergence: of each file's next-token distribution from the merged model's (base + "
                        "adapter, in PyTorch), per token of the same held-out text; same top token: how often "
                        "both put the same token first (llama.cpp's `perplexity --kl-divergence` measures)."]
        out += _calibration_lines(record)
    out += ["", "## Training", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _training_rows(record)]
    out += ["", "## Files", ""]
    described = {"template": "Ollama chat template (Go template)", "params": "Ollama parameters (stop tokens)",
                 "system": "Ollama system prompt", "Modelfile": "for `ollama create` from a local download",
                 "Modelfile.completion": "the same as a plain completion model (no chat template)",
                 "run.json": "rawtune's record of the run (settings, data report, metrics)"}
    for q, file, size, _ in gguf_rows:
        out.append(f"- `{file}`: {q} GGUF, {_size(size)}")
    for path, what in described.items():
        if path in files:
            out.append(f"- `{path}`: {what}")
    if any(f.startswith("adapter/") for f in files):
        out.append("- `adapter/`: the LoRA adapter (peft)")
    out.append("")
    return "\n".join(out)
