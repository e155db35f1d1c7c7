"""The merge stage: fold the LoRA adapter into the base and save a plain HF folder.

The merged folder (safetensors + tokenizer) is for whoever wants merged weights; GGUF export
does not need it for a safetensors base (it merges tensor by tensor while writing the GGUF) and
writes it only for other bases. Merging runs on the CPU in
fp32 so the result does not depend on the training card. When embed_tokens and lm_head were
trained, they differ after merging, so a base with tied embeddings is saved untied (both tensors
kept, ``tie_word_embeddings: false``) instead of silently dropping one of them.
Running it twice is safe: a merged folder newer than the adapter is reused.

A base stored as safetensors is merged tensor by tensor (:mod:`rawtune.streamed`: a few tensors
in memory instead of the whole model in fp32), with the same result bit for bit as PEFT's
``merge_and_unload`` on the fp32 model, which :func:`merge_with_peft` still does for other bases.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import StageMissing
from .rundir import RunDir

STAMP = "rawtune_merge.json"


def _adapter_stamp(run: RunDir) -> dict:
    files = sorted(p for p in run.adapter_dir.iterdir() if p.is_file())
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def is_current(run: RunDir) -> bool:
    """True when merged/ was made from the adapter as it is now."""
    stamp = run.merged_dir / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == _adapter_stamp(run)


def untie_if_needed(model: Any) -> bool:
    """Give lm_head its own tensor when it no longer equals embed_tokens; return True if untied."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return False
    same_storage = head.weight.data_ptr() == embed.weight.data_ptr()
    if same_storage and torch.equal(head.weight, embed.weight):
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    config.tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    return True


def merge_with_peft(source: RunDir | tuple, out_dir: str | Path) -> Path:
    """PEFT's merge of the whole model in fp32 (needs 4 bytes of RAM per parameter); returns ``out_dir``.

    ``source``: a run directory or a (base folder, adapter folder) pair.
    """
    import torch

    from .models import base_and_adapter, load_tokenizer, load_tuned

    model = load_tuned(source, device="cpu", dtype=torch.float32, merge=True)
    untie_if_needed(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(base_and_adapter(source)[0]).save_pretrained(str(out_dir))
    return Path(out_dir)


def _tied(folder: Path) -> bool:
    return bool(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings", False))


def merge_run(run: RunDir, log: Callable[[str], None] = print) -> Path:
    """Write ``merged/`` from the base model and the adapter (reused when already current)."""
    model_info = run.require("model", "train")
    if not run.has_adapter():
        raise StageMissing(f"{run.adapter_dir} has no adapter: run `rawtune train` first")
    if is_current(run):
        log(f"[merge] {run.merged_dir} is up to date")
        return run.merged_dir
    from .streamed import has_safetensors, write_merged_folder

    started = time.time()
    base_dir = Path(model_info["local_dir"])
    tmp = run.path / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    stream = has_safetensors(base_dir)
    if stream:
        untied = write_merged_folder(run, tmp, log=log)["untied_embeddings"]
    else:
        merge_with_peft(run, tmp)
        untied = _tied(base_dir) and not _tied(tmp)
    (tmp / STAMP).write_text(json.dumps(_adapter_stamp(run)))
    shutil.rmtree(run.merged_dir, ignore_errors=True)
    os.replace(tmp, run.merged_dir)
    seconds = round(time.time() - started, 2)
    run.update(merge={"dir": run.merged_dir.name, "seconds": seconds, "untied_embeddings": untied,
                      "streamed": stream})
    log(f"[merge] wrote {run.merged_dir} in {seconds}s{' (embeddings untied: both were trained)' if untied else ''}")
    return run.merged_dir
