"""The export stage's steps, one function each: plan -> convert -> reference model -> quantize ->
verify -> Ollama files -> clean up -> record. :func:`rawtune.export.export_run` runs them in that order.

- plan: validate ``--quant``, decide where the weights come from and, from a fingerprint of those
  files, which earlier outputs are still current (decided once, in :class:`Plan`). A base stored
  as safetensors is merged with the adapter tensor by tensor while the GGUF is written
  (:mod:`rawtune.streamed`), so no merged folder is written and memory holds a few tensors, not
  the model; only for other bases is ``merged/`` written first (``rawtune.merge.merge_run``);
- convert: the F16 GGUF from rawtune's own writer (:mod:`.gguf_writer`), tensor infos first, then
  each tensor as it is merged;
- reference model: the merged model in PyTorch, loaded once, for the importance matrix and H
  (:mod:`.imatrix`, one layer at a time through :mod:`.layerwise`, on the GPU when there is one)
  and the merged model's held-out perplexity (on the GPU when the model fits there); fp32 up to
  :data:`FP32_MAX_PARAMS` parameters, bf16 above (it would need 4 bytes per parameter); freed
  before llama.cpp opens any GGUF;
- quantize: llama.cpp's own quantizer through llama-cpp-python (no git, cmake or compiler at run
  time) and, for k-quants, each tensor re-quantized with the importance matrix from the training
  text; llama.cpp's log goes to ``logs/export.log``, the console gets one summary line per file;
- verify: every file loaded in llama.cpp (:mod:`.llama`), several at once (:func:`in_parallel`),
  on held-out blocks bounded per file for large models (:func:`bound_blocks`): tokenization agrees with the HF
  tokenizer, a few greedy tokens come out, and the perplexity on the run's held-out blocks (the
  same blocks ``rawtune eval`` scores) is close to the merged PyTorch model's; a file far above
  it is a conversion bug, reported loudly. The same pass gives each file's KL divergence from the
  merged model (:mod:`.kld`: the merged model's logits kept from its own perplexity pass);
- Ollama files (:mod:`.ollama`); clean up: the F16 work file, the config/tokenizer folder the
  writer read and files of quant types not asked for this time; the ``gguf``/``export`` records
  in run.json.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .. import quants
from ..errors import ExportError
from ..rundir import RunDir
from ..settings import ExportSettings, free_gpu_memory
from .kld import ReferenceStore, Scorer, kld_text, store_reference
from .llama import cpu_threads, llama_cpp, llama_log, load_llama

Log = Callable[[str], None]

# Bump when the writer's output changes, so older GGUFs are rebuilt instead of reused.
WRITER_VERSION = 1
LOG_FILE = "logs/export.log"  # llama.cpp's full quantizer output, inside the run directory
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. In 1984, 3 engineers wrote 12,345 lines;\n"
               "they said: \"it's done!\"  Tabs\tand  spaces,  café naïve résumé, emoji 🙂 and (brackets) [x] {y}.")
GREEDY_TOKENS = 8
WORK_DIR = "gguf_work"
SOURCE_DIR = "model"  # inside WORK_DIR: the merged model's config and tokenizer, for the streamed writer
REFERENCE_FILE = "{stem}.reference-logprobs.npy"  # inside WORK_DIR while files are verified (see .kld)
CHECK_REFERENCE_FILE = "{stem}.check-logprobs.npy"  # the same for the keep check's training blocks
HESSIAN_DIR = "hessians"  # inside WORK_DIR: H matrices past the layer-by-layer pass's RAM budget
# The PyTorch reference model is fp32 up to this many parameters (2.4 GB), bf16 above: fp32 keeps
# the small models' numbers exactly those of `rawtune eval`; a 1B+ model in fp32 needs 4+ GB.
# Above it the model also reads one block at a time: four blocks of 512 tokens make 400 MB of
# logits with a 49k vocabulary, and more than that in the softmax, on top of the model.
FP32_MAX_PARAMS = 600_000_000


def file_stem(run: RunDir, name: Optional[str]) -> str:
    """The GGUF file name stem: --name, else the run directory's name, made file-name safe."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name or run.path.resolve().name).strip("-.")
    if not stem:
        raise ExportError(f"cannot make a file name from {name!r}; pass --name with letters or digits")
    return stem


def fingerprint(folders: list[Path], stem: str) -> str:
    """Identifies what the GGUF is made from (the files of ``folders``: sizes and times) and the writer.

    Streamed, the folders are the base model's and the adapter's; else the merged folder's.
    """
    parts = [f"v{WRITER_VERSION}", stem]
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                st = path.stat()
                parts.append(f"{folder.name}/{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- plan


@dataclass
class Plan:
    """What this export makes, and what it keeps from the previous one."""

    labels: list[str]  # quant labels asked for, in --quant order
    stem: str
    model_dir: Path  # config.json and tokenizer of the merged model (and its weights when not streamed)
    out_dir: Path
    work_dir: Path
    fingerprint: str
    earlier: dict[str, Any]  # the previous export record when it was made from the same files, else {}
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)  # run.json gguf entries still current
    seconds_merge: float = 0.0
    calibration: Optional[np.ndarray] = None  # training blocks for the importance matrix (None: no matrix)
    check_blocks: Optional[np.ndarray] = None  # other training blocks: is the weighted file better than the plain?
    check_reference: Optional[ReferenceStore] = None  # the merged model's log-probabilities on check_blocks
    seconds_check_reference: float = 0.0  # the merged model's pass over check_blocks
    base_dir: Optional[Path] = None  # streamed: the base model the tensors are merged from ...
    adapter_dir: Optional[Path] = None  # ... with this adapter (None: the weights are in model_dir)
    specs: list = field(default_factory=list)  # (HF name, shape) of every merged tensor, from the file headers

    @property
    def params(self) -> int:
        """Parameters of the merged model (decides the reference model's dtype)."""
        return sum(math.prod(shape) for _, shape in self.specs)

    def target(self, label: str) -> Path:
        return self.out_dir / quants.file_name(self.stem, label)

    @property
    def f16(self) -> Path:
        """The F16 file the quantizer reads: the requested F16 itself, or a work file."""
        return self.target("F16") if "F16" in self.labels else self.work_dir / quants.file_name(self.stem, "F16")

    @property
    def streamed(self) -> bool:
        return self.base_dir is not None

    def tensors(self) -> Any:
        """The writer's tensor source: merged while written (streamed), else the merged folder's files."""
        from .gguf_writer import TensorSource, iter_hf_tensors

        if not self.streamed:
            return TensorSource(self.specs, iter_hf_tensors(self.model_dir))
        from ..streamed import iter_merged_arrays

        return TensorSource(self.specs, iter_merged_arrays(self.base_dir, self.adapter_dir))

    def imatrix_tokens(self, label: str) -> int:
        """Calibration tokens the file of ``label`` is made with (0: no importance matrix)."""
        return int(self.calibration.size) if self.calibration is not None and quants.get(label).imatrix else 0

    @property
    def todo(self) -> list[str]:
        return [label for label in self.labels if label not in self.kept]


def plan(run: RunDir, settings: ExportSettings, log: Log) -> Plan:
    """Check --quant, find the weights, and keep the earlier outputs made from the very same files."""
    labels = quants.labels_for(settings.quant)
    stem = file_stem(run, settings.name)
    started = time.time()
    work_dir = run.path / WORK_DIR
    model_dir, base_dir, adapter_dir, folders = _source(run, work_dir, log)
    seconds_merge = time.time() - started
    record = run.load()
    stamp = fingerprint(folders, stem)
    earlier = record.get("export") or {}
    p = Plan(labels, stem, model_dir, run.gguf_dir, work_dir, stamp,
             earlier if earlier.get("fingerprint") == stamp else {}, seconds_merge=seconds_merge,
             base_dir=base_dir, adapter_dir=adapter_dir)
    p.specs = _specs(p)
    p.out_dir.mkdir(parents=True, exist_ok=True)
    p.calibration, p.check_blocks = _calibration_blocks(run, settings, labels, log)
    if p.check_blocks is not None:  # scored in llama.cpp twice per file: the same bound as verification's
        p.check_blocks = bound_blocks(p.check_blocks, p.params)
    _require_imatrix(labels, p.calibration)
    previous = record.get("gguf") or {}
    p.kept = {label: info for label, info in previous.items() if label in labels and _current(p, label, info)}
    for label in p.kept:
        log(f"[export] {p.target(label).name} is up to date")
    return p


def _source(run: RunDir, work_dir: Path, log: Log) -> tuple[Path, Optional[Path], Optional[Path], list[Path]]:
    """(folder with config + tokenizer, base dir, adapter dir, folders the fingerprint covers).

    A safetensors base is streamed: only the merged config and tokenizer are written (to the work
    folder). Any other base is merged into ``merged/`` first, which the writer then reads.
    """
    from ..merge import merge_run
    from ..models import base_and_adapter
    from ..streamed import has_safetensors, write_skeleton

    base_dir, adapter_dir = base_and_adapter(run)
    if not has_safetensors(base_dir):
        merged = Path(merge_run(run, log=log))
        return merged, None, None, [merged]
    skeleton = work_dir / SOURCE_DIR
    shutil.rmtree(skeleton, ignore_errors=True)
    write_skeleton((base_dir, adapter_dir), skeleton)
    return skeleton, base_dir, adapter_dir, [base_dir, adapter_dir]


def _specs(p: Plan) -> list:
    """Names and shapes of the merged tensors, read once from the file headers (no weights loaded)."""
    if not p.streamed:
        from .gguf_writer import folder_tensors

        return folder_tensors(p.model_dir).specs
    from ..streamed import merged_shapes

    return merged_shapes((p.base_dir, p.adapter_dir))


def _current(p: Plan, label: str, info: dict[str, Any]) -> bool:
    path = p.target(label)
    return (bool(p.earlier) and path.is_file() and info.get("bytes") == path.stat().st_size
            and (info.get("imatrix_asked", info.get("imatrix_tokens")) or 0) == p.imatrix_tokens(label))


def _require_imatrix(labels: list[str], calibration: Optional[np.ndarray]) -> None:
    """Types that are only worth making with an importance matrix (IQ4_XS) need training blocks for one."""
    needing = [label for label in labels if quants.get(label).needs_imatrix]
    if needing and calibration is None:
        raise ExportError(f"{', '.join(needing)} is only made with an importance matrix, and this export has "
                          f"none (--imatrix-blocks 0, or no data/train.npy); set --imatrix-blocks 16 after "
                          f"`rawtune data`, or pick q4_k_m instead")


def _calibration_blocks(run: RunDir, settings: ExportSettings, labels: list[str],
                        log: Log) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Training blocks for the importance matrix, and others to check it with (None: no matrix)."""
    from .imatrix import pick_blocks

    if settings.imatrix_blocks <= 0 or not any(quants.get(label).imatrix for label in labels):
        return None, None
    path = run.data_dir / "train.npy"
    if not path.is_file():
        log(f"[export] {path} not found: quantizing without an importance matrix")
        return None, None
    train = np.load(path, mmap_mode="r")
    calibration, rest = pick_blocks(train, settings.imatrix_blocks, with_rest=True)
    check = pick_blocks(rest, CHECK_BLOCKS)
    return (np.asarray(calibration, dtype=np.int64) if len(calibration) else None,
            np.asarray(check, dtype=np.int64) if len(check) else None)


# ---------------------------------------------------------------- convert and quantize


def convert(p: Plan, license: Optional[str], gguf: dict[str, dict], log: Log) -> tuple[Optional[dict], float]:
    """Write the F16 GGUF when anything is to be made; return the conversion record and seconds."""
    from . import gguf_writer

    if not p.todo:
        return p.earlier.get("conversion"), 0.0
    if p.streamed:
        log(f"[export] merging {p.adapter_dir.name}/ into {p.base_dir.name} tensor by tensor while writing the "
            f"F16 GGUF (no merged/ folder; `rawtune merge` writes one)")
    t0 = time.time()
    conversion = gguf_writer.convert(p.model_dir, p.f16, "f16", name=p.stem, license=license, log=log,
                                     tensors=p.tensors())
    seconds = time.time() - t0
    log(f"[export] {'merged and wrote' if p.streamed else 'wrote'} F16 GGUF ({conversion['tensors']} tensors, {conversion['tokenizer']} tokenizer"
        f"{', pre-tokenizer ' + conversion['pre_tokenizer'] if conversion['pre_tokenizer'] else ''}) "
        f"in {seconds:.1f}s")
    if "F16" in p.todo:
        gguf["F16"] = {"file": p.f16.name, "bytes": p.f16.stat().st_size, "seconds": round(seconds, 2)}
    return conversion, seconds


_FALLBACK_RE = re.compile(r"warning:\s+(\S+)\s+-\s+ncols\s+(\d+)\s+not divisible by\s+(\d+)\s+"
                          r"\(required for type\s+(\S+)\)\s*(?:\(WARNING:[^)]*\)\s*)?-> falling back to\s+(\S+)")


def fallback_summary(log_text: str, quantized: int) -> Optional[str]:
    """One line for llama.cpp's per-tensor fallback warnings, or None when no tensor fell back.

    ``quantized`` is the number of tensors llama.cpp quantized (the 2-D ones).
    """
    moves: dict[tuple[str, str], int] = {}
    reasons: dict[tuple[int, int], None] = {}
    for _name, cols, block, old, new in _FALLBACK_RE.findall(log_text):
        key = (old.upper(), new.upper())
        moves[key] = moves.get(key, 0) + 1
        reasons[(int(cols), int(block))] = None
    if not moves:
        return None
    parts = [f"{n} of {quantized} tensors fell back from {a} to {b}" if i == 0 else f"{n} from {a} to {b}"
             for i, ((a, b), n) in enumerate(sorted(moves.items(), key=lambda kv: -kv[1]))]
    why = ", ".join(f"width {cols} is not a multiple of {block}" for cols, block in reasons)
    return f"{'; '.join(parts)}: {why}"


def quantize(src: Path, dst: Path, label: str, log_path: Optional[Path] = None) -> tuple[float, Optional[str]]:
    """Quantize ``src`` (F16 GGUF) to ``dst`` with llama.cpp's quantizer.

    Returns the seconds taken and the fallback summary line (None when no tensor fell back);
    llama.cpp's own log is appended to ``log_path`` (dropped when None).
    """
    cpp = llama_cpp()
    params = cpp.llama_model_quantize_default_params()
    params.ftype = quants.get(label).ftype
    params.nthread = cpu_threads()
    tmp = dst.with_name(dst.name + ".partial")
    started = time.time()
    with llama_log(log_path, f"llama_model_quantize {src.name} -> {dst.name} ({label})") as chunks:
        rc = cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {src.name} to {label} (code {rc}); "
                          f"check free disk space and that the F16 file loads (details in {log_path})")
    os.replace(tmp, dst)
    seconds = time.time() - started
    counts = tensor_types(dst)
    return seconds, fallback_summary("".join(chunks), sum(n for t, n in counts.items() if t != "F32"))


def quantize_all(run: RunDir, p: Plan, gguf: dict[str, dict], imatrix: Any, log: Log) -> float:
    """Quantize every asked-for type still to be made (with the importance matrix where it
    changes the file); record sizes and tensor types. Returns the seconds taken."""
    total = 0.0
    try:
        for label in p.todo:
            if label == "F16":
                continue
            gguf[label] = _quantize_one(p.f16, p.target(label), label, imatrix, p, run.path / LOG_FILE, log)
            total += gguf[label]["seconds"]
    finally:
        if p.check_reference is not None:
            p.check_reference.close()  # the keep checks are done: its file goes
            p.check_reference = None
    for label in p.todo:
        gguf[label]["tensor_types"] = tensor_types(p.target(label))
    return total


def _quantize_one(f16: Path, target: Path, label: str, imatrix: Any, p: Plan,
                  log_path: Path, log: Log) -> dict[str, Any]:
    """One quantized file: llama.cpp's, then (k-quants with a matrix) re-quantized with the matrix,
    kept only where it scores better than llama.cpp's own file (:func:`keep_better`)."""
    from . import imatrix as imatrix_mod

    weighted = imatrix is not None and quants.get(label).imatrix
    out = p.work_dir / f"{target.stem}.default.gguf" if weighted else target
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds, fallback = quantize(f16, out, label, log_path)
    entry: dict[str, Any] = {"file": target.name, "imatrix_tokens": imatrix.tokens if weighted else 0,
                             "imatrix_asked": imatrix.tokens if weighted else 0}
    note = ""
    if weighted:
        t0 = time.time()
        try:
            gpu = export_device() if export_device().type == "cuda" else None
            count, entry["compensated_tensors"] = imatrix_mod.quantize_file(f16, out, target, imatrix, cpu_threads(),
                                                                            device=gpu)
            entry["seconds_requantize"] = round(time.time() - t0, 2)
            if count:
                entry["imatrix_check"] = keep_better(out, target, p.check_blocks, reference=p.check_reference)
            else:  # nothing rewritten (Q8_0 without H matrices): the file is llama.cpp's, nothing to score
                entry["imatrix_check"] = {"kept": "plain", "blocks": 0}
        finally:
            out.unlink(missing_ok=True)
        entry["seconds_weighting"] = round(time.time() - t0, 2)
        seconds += entry["seconds_weighting"]
        note = _check_note(entry["imatrix_check"], count, entry["compensated_tensors"])
        if entry["imatrix_check"]["kept"] == "plain":
            entry["imatrix_tokens"] = entry["compensated_tensors"] = 0
    entry.update(bytes=target.stat().st_size, seconds=round(seconds, 2), fallback=fallback)
    log(f"[export] quantized {target.name} ({entry['bytes'] / 2**20:.1f} MiB) in {seconds:.1f}s{note}")
    if fallback:
        log(f"[export] {label}: {fallback} (llama.cpp's log: {LOG_FILE})")
    return entry


# Training blocks, other than the importance matrix's, that both files of a type (plain, weighted) are scored on.
CHECK_BLOCKS = 8


def keep_better(plain: Path, weighted: Path, blocks: Optional[np.ndarray],
                reference: Optional[ReferenceStore] = None) -> dict[str, Any]:
    """Keep at ``weighted`` whichever of the two files is closer to the merged model on ``blocks``:
    by mean KL divergence where ``reference`` holds the merged model's log-probabilities there,
    else by perplexity.

    The importance matrix lowered held-out perplexity on some corpora and raised it on others
    (Debian changelogs: +5.4 % instead of llama.cpp's +3.9 %), and scores on training blocks the
    matrix was not computed from pointed the same way as the held-out ones in both cases. The held-out
    blocks themselves stay out of the choice, so the numbers export reports are not selected on.
    KL divergence decides where it can: for Q8_0 the two perplexities differed by less than their
    noise (13.2779 against 13.2607 on the quick start) while the compensated file's held-out KLD
    was 0.78 x the plain one's.
    """
    if blocks is None:
        return {"kept": "importance matrix", "blocks": 0}

    def score(path: Path, threads: int) -> tuple[float, Optional[float]]:
        llm = load_llama(path, n_ctx=int(blocks.shape[1]), logits_all=True, n_threads=threads)
        scorer = Scorer(reference) if reference is not None else None
        try:
            ppl = round(llama_perplexity(llm, blocks, scorer), 4)
        finally:
            llm.close()
        return ppl, (scorer.summary() or {}).get("kld_mean") if scorer is not None else None

    (ppl_plain, kld_plain), (ppl_weighted, kld_weighted) = in_parallel(score, [plain, weighted])
    if kld_plain is not None and kld_weighted is not None:
        better = kld_weighted < kld_plain
    else:
        better = ppl_weighted < ppl_plain
    kept = "importance matrix" if better else "plain"
    if kept == "plain":
        os.replace(plain, weighted)
    out = {"kept": kept, "blocks": int(len(blocks)), "ppl_plain": ppl_plain, "ppl_weighted": ppl_weighted}
    if kld_plain is not None:
        out.update(kld_plain=kld_plain, kld_weighted=kld_weighted)
    return out


def _check_note(check: dict[str, Any], count: int, compensated: int = 0) -> str:
    how = f"{count} tensors weighted by the importance matrix"
    if compensated:
        how += f", {compensated} of them with error compensation"
    if not check.get("blocks"):
        return f", {how}"
    if check.get("kld_plain") is not None:
        scores = (f"KL divergence to the merged model {check['kld_weighted']:.5f} with it, {check['kld_plain']:.5f} "
                  f"without, on {check['blocks']} other training blocks")
    else:
        scores = (f"perplexity {check['ppl_weighted']:.4f} with it, {check['ppl_plain']:.4f} without, on "
                  f"{check['blocks']} other training blocks")
    if check["kept"] == "plain":
        return f"; kept llama.cpp's plain file: the importance matrix scored worse ({scores})"
    return f", {how} ({scores})"


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the GGUF holds, as written (its tensor table read back)."""
    from .gguf_index import read_index

    counts: dict[str, int] = {}
    try:
        tensors = read_index(path)
    except (ValueError, KeyError) as exc:  # an unknown type code is a KeyError
        raise ExportError(f"{path.name} is not a readable GGUF file ({exc}); it is damaged "
                          f"or truncated: delete it and export again") from None
    for tensor in tensors:
        key = tensor.type_name
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- verify


def _nll_from_logits(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Summed negative log-likelihood of tokens[1:] given logits[:-1], the count, and each row's
    log-sum-exp (the KL divergence scorer reuses it). The exponentials are float32 (shifted by the
    row's maximum, so none overflows) and their sums float64: a float64 copy of a 512 x 49k block
    cost 1.5 s per block on a 2-core machine, a tenth of this."""
    x = np.asarray(logits[:-1], dtype=np.float32)
    n = len(tokens) - 1
    top = x.max(axis=-1)
    picked = x[np.arange(n), tokens[1:]].astype(np.float64)
    shifted = np.subtract(x, top[:, None])
    lse = np.log(np.exp(shifted, out=shifted).sum(axis=-1, dtype=np.float64)) + top
    return float((lse - picked).sum()), n, lse


def llama_logits(llm: Any, tokens: np.ndarray) -> np.ndarray:
    """llama.cpp's logits for every position of ``tokens`` (the model must have logits_all)."""
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_perplexity(llm: Any, blocks: np.ndarray, scorer: Optional[Scorer] = None) -> float:
    """llama.cpp's perplexity on ``blocks``; ``scorer`` also gets each block's logits (KL divergence)."""
    total, count = 0.0, 0
    for index, block in enumerate(blocks):
        logits = llama_logits(llm, block)
        nll, n, lse = _nll_from_logits(logits, block)
        total, count = total + nll, count + n
        if scorer is not None:
            scorer.add(index, logits, lse)
    return float(np.exp(total / count))


def reference_dtype(params: int) -> Any:
    """fp32 up to :data:`FP32_MAX_PARAMS` parameters, bf16 above."""
    import torch

    return torch.float32 if params <= FP32_MAX_PARAMS else torch.bfloat16


def load_reference(p: Plan, log: Log) -> Any:
    """The merged model in PyTorch on the CPU, without a merged folder when streamed: the base is
    loaded and each weight overwritten with its merged value (one extra tensor in memory)."""
    from ..models import load_causal_lm, load_tuned

    dtype = reference_dtype(p.params)
    why = (f"up to {FP32_MAX_PARAMS / 1e6:.0f}M parameters" if p.params <= FP32_MAX_PARAMS else
           f"above {FP32_MAX_PARAMS / 1e6:.0f}M parameters; fp32 would need {4 * p.params / 1e9:.1f} GB; "
           f"one block at a time")
    log(f"[export] merged PyTorch model for the importance matrix and the perplexity check: "
        f"{p.params / 1e6:,.0f}M parameters in {str(dtype).replace('torch.', '')} ({why})")
    if not p.streamed:
        return load_causal_lm(p.model_dir, device="cpu", dtype=dtype).eval()
    from ..streamed import fill_merged

    model = load_causal_lm(p.base_dir, device="cpu", dtype=dtype)
    try:
        fill_merged(model, (p.base_dir, p.adapter_dir))
        return model.eval()
    except KeyError as exc:  # a model class that renames checkpoint keys: let PEFT merge instead
        missing = exc
    del model  # before PEFT loads a second copy
    log(f"[export] {missing} is not a parameter name of the loaded model: merging with PEFT instead")
    return load_tuned((p.base_dir, p.adapter_dir), device="cpu", dtype=dtype, merge=True)


def check_tokenizer(llm: Any, tokenizer: Any, texts: list[str]) -> list[str]:
    """Texts on which llama.cpp's tokenization differs from the HF tokenizer's (empty: all agree)."""
    bad = []
    for text in texts:
        for special in (False, True):
            hf = tokenizer.encode(text, add_special_tokens=special)
            cpp = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)
            if list(hf) != list(cpp):
                first = next((i for i, (a, b) in enumerate(zip(hf, cpp)) if a != b), min(len(hf), len(cpp)))
                bad.append(f"{text[:40]!r} (add_special={special}): ids differ from position {first} "
                           f"(HF {list(hf)[first:first + 4]}, llama.cpp {list(cpp)[first:first + 4]})")
    return bad


def verify_file(path: Path, tokenizer: Any, blocks: Optional[np.ndarray], texts: list[str],
                prompt: str, n_ctx: int, reference: Optional[ReferenceStore] = None,
                n_threads: Optional[int] = None) -> dict[str, Any]:
    """Load one GGUF in llama.cpp: tokenization check, greedy sample, held-out perplexity and (with
    the merged model's stored logits) the KL divergence from the merged model on the same tokens.
    Several files may be verified at once from threads (``n_threads`` each)."""
    started = time.time()
    scorer = Scorer(reference) if reference is not None and blocks is not None else None
    llm = load_llama(path, n_ctx, logits_all=blocks is not None, n_threads=n_threads)
    try:
        with _TOKENIZER_LOCK:  # a fast HF tokenizer refuses to encode from two threads at once
            mismatches = check_tokenizer(llm, tokenizer, texts)
        out = llm.create_completion(prompt, max_tokens=GREEDY_TOKENS, temperature=0.0, top_k=1)
        sample = out["choices"][0]["text"]
        ppl = llama_perplexity(llm, blocks, scorer) if blocks is not None else None
    finally:
        llm.close()
    return {"ppl": None if ppl is None else round(ppl, 4), **((scorer and scorer.summary()) or {}),
            "tokenizer_ok": not mismatches, "tokenizer_mismatches": mismatches[:5], "sample": sample,
            "verify_seconds": round(time.time() - started, 2)}


_TOKENIZER_LOCK = threading.Lock()


def in_parallel(work: Callable[[Any, int], Any], items: list) -> list:
    """``work(item, n_threads)`` for every item, as many at once as there are idle cores, the cores
    split between them (llama.cpp's threads wait for each other at every layer, so a small model
    scores faster as several files on one core each than one file at a time on all of them)."""
    if not items:
        return []
    cores = cpu_threads()
    workers = max(1, min(len(items), cores))
    threads = max(1, cores // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: work(item, threads), items))


# llama.cpp scores every file on the CPU, on the same held-out blocks as the merged model. A file's
# pass costs about 2 x parameters FLOPs per token, so for a large model the blocks are bounded to
# this many FLOPs per file (at least MIN_VERIFY_BLOCKS blocks): all of SCORING_TOKEN_BUDGET's 8192
# tokens up to about 900M parameters, 12 blocks of 512 at 1.2B, two at 8B.
VERIFY_FLOPS = 1.5e13
MIN_VERIFY_BLOCKS = 2


def bound_blocks(blocks: np.ndarray, params: int) -> np.ndarray:
    """The first held-out blocks within :data:`VERIFY_FLOPS` per file for a model of ``params``."""
    tokens = int(VERIFY_FLOPS / (2 * max(1, params)))
    keep = max(MIN_VERIFY_BLOCKS, tokens // int(blocks.shape[1]))
    return blocks[:keep]


def _heldout_blocks(run: RunDir, log: Log) -> Optional[np.ndarray]:
    """The held-out blocks ``rawtune eval`` scores (None when the run has none)."""
    from ..evaluate import scoring_blocks

    path = run.data_dir / "heldout.npy"
    if not path.is_file():
        log(f"[export] {path} not found: skipping perplexity checks (run `rawtune data` to get held-out blocks)")
        return None
    blocks = scoring_blocks(np.load(path))
    if not len(blocks):
        log(f"[export] {path} holds no blocks: skipping perplexity checks")
        return None
    return blocks


def _check_texts(tokenizer: Any, blocks: Optional[np.ndarray]) -> tuple[list[str], str]:
    """Sample texts for the tokenizer check (fixed text + decoded held-out text) and a prompt."""
    texts = [SAMPLE_TEXT]
    prompt = "The"
    if blocks is not None:
        # Without special tokens: SentencePiece tokenizers differ between HF and llama.cpp in
        # whether a space mark is added after a special token, which is not a conversion error.
        texts.append(tokenizer.decode(blocks[0][:256].tolist(), skip_special_tokens=True).strip())
        prompt = tokenizer.decode(blocks[0][:24].tolist(), skip_special_tokens=True) or prompt
    return texts, prompt


def _ppl_text(ppl: Optional[float], merged: Optional[float]) -> str:
    """``12.3456 (+4.37% over the merged model)``, or just the number when there is nothing to compare."""
    if ppl is None:
        return "not measured"
    if not merged:
        return f"{ppl:.4f}"
    return f"{ppl:.4f} ({100.0 * (ppl / merged - 1.0):+.2f}% over the merged model)"


def _tuned_note(record: dict[str, Any], shape: Optional[list[int]]) -> str:
    """Eval's tuned-model number when it was measured on the same blocks (it should be the same)."""
    metrics = record.get("metrics") or {}
    if metrics.get("ppl_tuned") is not None and metrics.get("ppl_blocks") == shape:
        return f" (rawtune eval, tuned model with its adapter: {metrics['ppl_tuned']:.4f})"
    return ""


def _warn(log: Log, text: str, warnings: list[str]) -> None:
    warnings.append(text)
    bar = "!" * 72
    log(f"[export] {bar}\n[export] WARNING: {text}\n[export] {bar}")


@dataclass
class Verification:
    """Perplexities of the merged model and the F16 file, the blocks scored, warnings, time."""

    ppl_merged: Optional[float]
    ppl_f16: Optional[float]
    blocks: Optional[list[int]]
    warnings: list[str]
    seconds: float
    heldout: Optional[np.ndarray] = None  # the blocks scored now (None: no perplexity)
    to_verify: list[str] = field(default_factory=list)  # labels to load in llama.cpp this time
    rescore: bool = False  # other blocks than the earlier export's: every file is scored again
    seconds_reference: float = 0.0  # the PyTorch model's perplexity
    seconds_model: float = 0.0  # loading the PyTorch model (shared by the importance matrix and the perplexity)
    reference: Optional[ReferenceStore] = None  # the merged model's log-probabilities on ``heldout`` (KL divergence)
    kld_f16: Optional[dict[str, Any]] = None  # the F16 work file's KL divergence (a conversion error shows here)


def prepare_verification(run: RunDir, p: Plan, enabled: bool, log: Log) -> Verification:
    """Which files llama.cpp checks this time, on which held-out blocks, and what is kept from before."""
    check = Verification(p.earlier.get("ppl_merged"), p.earlier.get("ppl_f16"), p.earlier.get("ppl_blocks"), [], 0.0,
                         kld_f16=p.earlier.get("kld_f16"))
    if not enabled:
        return check
    check.heldout = _heldout_blocks(run, log)
    if check.heldout is not None:
        available = len(check.heldout)
        check.heldout = bound_blocks(check.heldout, p.params)
        n, width = check.heldout.shape
        why = ("all of them" if n == available else
               f"bounded for a {p.params / 1e9:.1f}B-parameter model to about {VERIFY_FLOPS:.1e} FLOPs per file")
        log(f"[export] verification scores {n} held-out blocks ({n * width:,} tokens) of the {available} "
            f"`rawtune eval` scores ({why}), the merged model and every file on the same tokens")
    shape = None if check.heldout is None else [int(check.heldout.shape[0]), int(check.heldout.shape[1])]
    if shape != check.blocks:  # other blocks than the earlier export scored: score all again
        check.ppl_merged = check.ppl_f16 = check.kld_f16 = None
        check.rescore = True
    scored = "verify_seconds" if check.heldout is None else "kld_mean"  # files verified before KLD existed
    check.to_verify = [label for label in p.labels
                       if check.rescore or label not in p.kept or scored not in p.kept[label]]
    if check.to_verify:
        check.blocks = shape
    return check


def reference(run: RunDir, p: Plan, check: Verification, log: Log) -> Any:
    """Load the merged PyTorch model once (when anything needs it): the importance matrix, and the
    merged model's perplexity whose logits are kept for the files' KL divergence; then free it
    before llama.cpp opens a GGUF. Returns the matrix or None."""
    need_imatrix = any(p.imatrix_tokens(label) for label in p.todo)
    need_ppl = bool(check.to_verify) and check.heldout is not None
    if not (need_imatrix or need_ppl):
        return None
    t0 = time.time()
    model = load_reference(p, log)
    batch = 4 if p.params <= FP32_MAX_PARAMS else 1
    check.seconds_model = time.time() - t0
    log(f"[export] loaded the merged PyTorch model in {check.seconds_model:.1f}s")
    try:
        imatrix = _importance(p, model, log) if need_imatrix else None
        if imatrix is not None and p.check_blocks is not None:
            _check_reference(p, model, batch, log)
        if need_ppl:
            t1 = time.time()
            where = _perplexity_device(model, batch, check.heldout)
            model.to(where)
            check.reference, ppl = store_reference(model, check.heldout, p.work_dir / REFERENCE_FILE.format(stem=p.stem),
                                                   batch)
            check.ppl_merged = round(ppl, 4)
            check.seconds_reference = time.time() - t1
            log(f"[export] merged PyTorch model: perplexity {check.ppl_merged:.4f} on {check.heldout.shape[0]} "
                f"held-out blocks ({where.type}, {check.seconds_reference:.1f}s)" + _tuned_note(run.load(), check.blocks))
    finally:
        del model
        free_gpu_memory()  # the model's memory goes back before llama.cpp loads a file
    return imatrix


def export_device() -> Any:
    """Where export's PyTorch work runs: the GPU when torch sees one (layer by layer, so any size
    fits), else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _perplexity_device(model: Any, batch: int, blocks: np.ndarray) -> Any:
    """The GPU when the whole reference model and a batch's logits fit in its free memory, else the CPU."""
    import torch

    device = export_device()
    if device.type != "cuda":
        return device
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    vocab = int(model.get_output_embeddings().weight.shape[0])
    logits = 3 * 4 * min(batch, len(blocks)) * int(blocks.shape[1]) * vocab  # logits, float copy, softmax
    free, _ = torch.cuda.mem_get_info()
    return device if weights + logits + 2**30 < free else torch.device("cpu")


def _check_reference(p: Plan, model: Any, batch: int, log: Log) -> None:
    """The merged model's log-probabilities on the check blocks, so the keep check compares the two
    files of a type by KL divergence to the merged model (what quantizers compare), not perplexity."""
    t0 = time.time()
    where = _perplexity_device(model, batch, p.check_blocks)
    model.to(where)
    p.check_reference, _ = store_reference(model, p.check_blocks, p.work_dir / CHECK_REFERENCE_FILE.format(stem=p.stem),
                                           batch)
    p.seconds_check_reference = time.time() - t0
    log(f"[export] merged PyTorch model on {len(p.check_blocks)} other training blocks for the keep-or-plain check "
        f"({where.type}, {p.seconds_check_reference:.1f}s)")


def _importance(p: Plan, model: Any, log: Log) -> Any:
    from .imatrix import compute

    device = export_device()
    imatrix = compute(p.model_dir, p.calibration, source="data/train.npy (training blocks, spread evenly)",
                      model=model, device=device, spill_dir=p.work_dir / HESSIAN_DIR)
    log(f"[export] importance matrix from {imatrix.tokens:,} training tokens ({imatrix.blocks} blocks of "
        f"data/train.npy, {len(imatrix.values)} weights, H for {len(imatrix.hessians)}) layer by layer on "
        f"{device.type} in {imatrix.seconds:.1f}s")
    return imatrix


def verify(p: Plan, gguf: dict[str, dict], tokenizer: Any, check: Verification, log: Log) -> Verification:
    """Check each file not verified on these held-out blocks yet in llama.cpp, then each file's
    perplexity against its bound."""
    t0 = time.time()
    if check.rescore:
        for label in p.labels:
            gguf[label].pop("verify_seconds", None)
    try:
        if check.to_verify:
            _verify_files(p, check.to_verify, check.heldout, gguf, tokenizer, check, log)
    finally:
        if check.reference is not None:
            check.reference.close()  # hundreds of MB on a real model: gone as soon as the files are scored
            check.reference = None
    _check_bounds(p, gguf, check, log)
    check.seconds = time.time() - t0 + check.seconds_reference if check.to_verify else 0.0
    return check


def _verify_files(p: Plan, to_verify: list[str], blocks: Optional[np.ndarray], gguf: dict[str, dict],
                  tokenizer: Any, check: Verification, log: Log) -> None:
    texts, prompt = _check_texts(tokenizer, blocks)
    n_ctx = int(blocks.shape[1]) if blocks is not None else 512
    labels = list(to_verify)
    if blocks is not None and "F16" not in p.labels and p.f16.is_file():
        labels.append("F16 (work file)")  # separates conversion error from quantization loss
    def one(label: str, threads: int) -> dict[str, Any]:
        path = p.f16 if label.startswith("F16") else p.target(label)
        return verify_file(path, tokenizer, blocks, texts, prompt, n_ctx, check.reference, threads)

    for label, result in zip(labels, in_parallel(one, labels)):
        if label.startswith("F16"):
            check.ppl_f16 = result["ppl"]
            check.kld_f16 = {k: v for k, v in result.items() if k.startswith("kld") or k == "same_top_pct"} or None
        if label in gguf:
            gguf[label].update(result)
        kld = kld_text(result)
        log(f"[export] llama.cpp {label}: perplexity {_ppl_text(result['ppl'], check.ppl_merged)}, "
            f"{kld + ', ' if kld else ''}tokenizer "
            f"{'agrees' if result['tokenizer_ok'] else 'DIFFERS'}, greedy {result['sample']!r} "
            f"({result['verify_seconds']:.1f}s)")
        if not result["tokenizer_ok"]:
            _warn(log, f"{label}: llama.cpp tokenizes differently from the HF tokenizer: "
                       f"{'; '.join(result['tokenizer_mismatches'][:2])}", check.warnings)


def _check_bounds(p: Plan, gguf: dict[str, dict], check: Verification, log: Log) -> None:
    """Each file's perplexity rise over the merged model, warned about above the table's bound."""
    checked = {label: gguf[label] for label in p.labels}
    if "F16" not in p.labels and check.ppl_f16 is not None:
        checked["F16"] = {"ppl": check.ppl_f16}  # the work file: a rise here is the writer's fault
    for label, entry in checked.items():
        ppl = entry.get("ppl")
        if ppl is None or not check.ppl_merged:
            continue
        rise = 100.0 * (ppl / check.ppl_merged - 1.0)
        entry["ppl_increase_pct"] = round(rise, 3)
        bound = quants.get(label).bound_pct
        if bound is not None and rise > bound:
            _warn(log, f"{label} perplexity {ppl:.4f} is {rise:+.2f}% over the merged model's "
                       f"{check.ppl_merged:.4f} (bound {bound}%): that is a conversion bug, not "
                       f"quantization noise", check.warnings)


# ---------------------------------------------------------------- clean up, Ollama files, record


def clean_up(p: Plan, log: Log) -> None:
    """Drop the F16 work file (only the quantizer needed it), the config/tokenizer folder the
    streamed writer read, and files of types not asked for now."""
    if p.f16.parent == p.work_dir and p.f16.is_file():
        p.f16.unlink()
    shutil.rmtree(p.work_dir / SOURCE_DIR, ignore_errors=True)
    shutil.rmtree(p.work_dir / HESSIAN_DIR, ignore_errors=True)
    if p.work_dir.is_dir() and not any(p.work_dir.iterdir()):
        p.work_dir.rmdir()
    for label in set(quants.EXPORTABLE_LABELS) - set(p.labels):
        if p.target(label).is_file():  # from an earlier export with other --quant: not published now
            p.target(label).unlink()
            log(f"[export] removed {p.target(label).name} (not in --quant this time)")


def remove_work_files(run: RunDir, stem: str) -> None:
    """After a failure: the F16 work file and half-written GGUFs, so a full disk does not stay full
    and a later export never mistakes a fragment for a finished file."""
    work_dir = run.path / WORK_DIR
    for path in [*work_dir.glob(f"{stem}.F16.gguf*"), *run.gguf_dir.glob(f"{stem}.*.gguf.partial"),
                 work_dir / REFERENCE_FILE.format(stem=stem)]:
        path.unlink(missing_ok=True)
    shutil.rmtree(work_dir / SOURCE_DIR, ignore_errors=True)
    shutil.rmtree(work_dir / HESSIAN_DIR, ignore_errors=True)
    if work_dir.is_dir() and not any(work_dir.iterdir()):
        work_dir.rmdir()


def ollama_files(p: Plan, tokenizer: Any, conversion: Optional[dict], log: Log) -> dict[str, Any]:
    """template, params, system and Modelfile for the smallest file asked for (the table's order)."""
    from . import gguf_writer, ollama

    first = min(p.labels, key=quants.sort_key)
    add_bos = bool((conversion or {}).get("add_bos", False))
    fmt = ollama.chat_format_for(tokenizer, add_bos, log=log)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    config = gguf_writer.read_json(p.model_dir / "config.json")
    context = int(config.get("max_position_embeddings") or 2048)
    written = ollama.write_files(p.out_dir, p.target(first).name, fmt, tokenizer.eos_token, specials, context)
    log(f"[export] wrote {', '.join(written['files'])} ({written['template']} template, stops {written['stop']})")
    return written


@dataclass
class Times:
    convert: float
    quantize: float
    verify: float
    imatrix: float = 0.0
    model: float = 0.0  # loading the merged PyTorch model, and its pass over the keep check's blocks


def record(run: RunDir, p: Plan, gguf: dict[str, dict], conversion: Optional[dict], check: Verification,
           written: dict[str, Any], times: Times, imatrix: Any, log: Log) -> dict[str, Any]:
    """Store ``gguf`` and ``export`` in run.json and log the summary; return ``export``."""
    reused = [label for label in p.labels if label in p.kept]
    if not p.todo and p.earlier:
        # Nothing was rebuilt: keep the times of the export that made these files.
        times = Times(p.earlier.get("seconds_convert", 0.0), p.earlier.get("seconds_quantize", 0.0),
                      times.verify or p.earlier.get("seconds_verify", 0.0), times.imatrix)
    imatrix_info = imatrix.summary() if imatrix is not None else None
    if imatrix is None and any(gguf[label].get("imatrix_tokens") for label in p.labels):
        imatrix_info = p.earlier.get("imatrix")  # the weighted files were reused
        times.imatrix = (imatrix_info or {}).get("seconds", 0.0)
    export = {
        "dir": p.out_dir.name,
        "name": p.stem,
        "seconds_merge": round(p.seconds_merge, 2),
        "seconds_convert": round(times.convert, 2),
        "seconds_quantize": round(times.quantize, 2),
        "seconds_verify": round(times.verify, 2),
        "seconds_imatrix": round(times.imatrix, 2),
        "seconds_reference_model": round(check.seconds_model, 2),
        "seconds_reference_ppl": round(check.seconds_reference, 2),
        "seconds_check_reference": round(p.seconds_check_reference, 2),
        "imatrix": imatrix_info,
        "log": LOG_FILE if (run.path / LOG_FILE).is_file() else None,
        "reused": reused,
        "files": [gguf[label]["file"] for label in p.labels] + written["files"],
        "ppl_merged": check.ppl_merged,
        "ppl_f16": check.ppl_f16 if "F16" not in p.labels else gguf["F16"].get("ppl"),
        "ppl_blocks": check.blocks,
        "kld_f16": check.kld_f16 if "F16" not in p.labels else None,
        "template": written["template"],
        "stop": written["stop"],
        "conversion": conversion,
        "streamed": p.streamed,
        "reference_dtype": str(reference_dtype(p.params)).replace("torch.", ""),
        "fingerprint": p.fingerprint,
        "warnings": check.warnings,
    }
    run.update(gguf={label: gguf[label] for label in p.labels}, export=export)
    total = p.seconds_merge + times.convert + times.model + times.imatrix + times.quantize
    log(f"[export] done: {'prepare' if p.streamed else 'merge'} {p.seconds_merge:.1f}s + "
        f"{'merge-and-convert' if p.streamed else 'convert'} {times.convert:.1f}s + PyTorch model "
        f"{times.model:.1f}s + importance matrix {times.imatrix:.1f}s + quantize {times.quantize:.1f}s = "
        f"{total:.1f}s; verification {times.verify:.1f}s"
        + (f" (reused {', '.join(reused)} from the previous export)" if reused else ""))
    return export
