"""The export stage: merged model -> GGUF files checked by llama.cpp, plus the files Ollama reads.

Steps: merge (``rawtune.merge.merge_run``, reused when current), convert to F16 with rawtune's own
writer (:mod:`rawtune.gguf_writer`), quantize with llama.cpp's own quantizer through
llama-cpp-python (no git, cmake or compiler at run time) and, for k-quants, re-quantize each
tensor with an importance matrix from the training text (:mod:`rawtune.imatrix`), then load every
file in llama.cpp and check it: tokenization agrees with the HF tokenizer, a few greedy tokens
come out, and the perplexity on the run's held-out blocks (the same blocks ``rawtune eval``
scores) is close to the merged PyTorch model's. A quantized file far above the merged model's
perplexity is a conversion bug, so it is reported loudly. llama.cpp's own log goes to
``logs/export.log``; the console gets one summary line per file. Running export twice reuses
files made from the same merged model with the same importance-matrix setting.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import quants as quants_table
from .errors import ExportError
from .rundir import RunDir
from .settings import ExportSettings

# Bump when the writer's output changes, so older GGUFs are rebuilt instead of reused.
WRITER_VERSION = 1
LOG_FILE = "logs/export.log"  # llama.cpp's full quantizer output, inside the run directory
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. In 1984, 3 engineers wrote 12,345 lines;\n"
               "they said: \"it's done!\"  Tabs\tand  spaces,  café naïve résumé, emoji 🙂 and (brackets) [x] {y}.")
GREEDY_TOKENS = 8


def _label_list(quants: list[str]) -> list[str]:
    labels = []
    for q in quants:
        label = quants_table.label_of(q)
        if label is None:
            raise ExportError(f"--quant {q!r} is unknown; use some of {', '.join(quants_table.EXPORTABLE)}")
        labels.append(label)
    if not labels:
        raise ExportError("--quant is empty; name at least one of " + ", ".join(quants_table.EXPORTABLE))
    return list(dict.fromkeys(labels))


def file_stem(run: RunDir, name: Optional[str]) -> str:
    """The GGUF file name stem: --name, else the run directory's name, made file-name safe."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name or run.path.resolve().name).strip("-.")
    if not stem:
        raise ExportError(f"cannot make a file name from {name!r}; pass --name with letters or digits")
    return stem


def _fingerprint(merged: Path, stem: str) -> str:
    """Identifies the merged model an output was made from (file sizes and times) and the writer."""
    parts = [f"v{WRITER_VERSION}", stem]
    for path in sorted(merged.iterdir()):
        if path.is_file():
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- llama.cpp


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("GGUF quantization and verification need llama-cpp-python: "
                          "`pip install llama-cpp-python==0.3.36` (or pip install 'rawtune[gguf]')") from None
    return llama_cpp


def cpu_threads() -> int:
    """Threads for llama.cpp: the idle cores, at least one.

    llama.cpp's threads wait for each other at every layer, so on a shared machine (a Space, or
    training running beside export) asking for busy cores makes it several times slower.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cores - _other_runnable()))


def _other_runnable() -> int:
    """Tasks running right now besides this one.

    The instantaneous count from /proc/loadavg, not the 1-minute load average: that average still
    counts rawtune's own training that has just finished, and would leave llama.cpp one thread.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return max(0, int(handle.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        try:
            return max(0, int(os.getloadavg()[0]) - 1)
        except OSError:  # not available on this platform
            return 0


@contextmanager
def llama_log(path: Path, title: str) -> Iterator[list[str]]:
    """Send llama.cpp's log to a list (appended to ``path`` afterwards) instead of the console.

    llama.cpp logs a line or two per tensor while quantizing (a fallback warning for most tensors
    of a small model); the caller turns those into one summary line.
    """
    llama_cpp = _llama_cpp()
    import llama_cpp._logger as cpp_logger  # llama-cpp-python's own callback, restored afterwards

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(cpp_logger.llama_log_callback, ctypes.c_void_p(0))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"==== {title} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{''.join(chunks)}\n")


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


def quantize(src: Path, dst: Path, label: str, log_path: Path) -> tuple[float, Optional[str]]:
    """Quantize ``src`` (F16 GGUF) to ``dst`` with llama.cpp's quantizer.

    Returns the seconds taken and the fallback summary line (None when no tensor fell back);
    llama.cpp's own log is appended to ``log_path``.
    """
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quants_table.get(label).ftype
    params.nthread = cpu_threads()
    tmp = dst.with_name(dst.name + ".partial")
    started = time.time()
    with llama_log(log_path, f"llama_model_quantize {src.name} -> {dst.name} ({label})") as chunks:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {src.name} to {label} (code {rc}); "
                          f"check free disk space and that the F16 file loads (details in {log_path})")
    os.replace(tmp, dst)
    seconds = time.time() - started
    counts = tensor_types(dst)
    return seconds, fallback_summary("".join(chunks), sum(n for t, n in counts.items() if t != "F32"))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the GGUF holds, as written (read back with gguf-py)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    try:
        tensors = GGUFReader(str(path)).tensors
    except Exception as exc:  # gguf-py raises ValueError, struct and numpy errors for damaged files
        raise ExportError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}); it is damaged "
                          f"or truncated: delete it and export again") from None
    for tensor in tensors:
        key = tensor.tensor_type.name
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def load_llama(path: Path, n_ctx: int, logits_all: bool = False, f32_cache: bool = False) -> Any:
    """Open a GGUF with llama.cpp on the CPU (callers must ``close()`` it).

    ``f32_cache`` keeps the KV cache in float32 instead of llama.cpp's default F16, for
    comparisons with PyTorch at float32 tolerance.
    """
    llama_cpp = _llama_cpp()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                               logits_all=logits_all, n_threads=cpu_threads(),
                               n_gpu_layers=0, verbose=False, **cache)
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError for bad files
        raise ExportError(f"llama.cpp could not load {path.name}: {exc}; the conversion is broken, "
                          f"report it with the model's config.json") from None


def _nll_from_logits(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:] given logits[:-1] (float64 for stability)."""
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    picked = x[np.arange(len(tokens) - 1), tokens[1:]]
    return float((lse - picked).sum()), len(tokens) - 1


def llama_logits(llm: Any, tokens: np.ndarray) -> np.ndarray:
    """llama.cpp's logits for every position of ``tokens`` (the model must have logits_all)."""
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_perplexity(llm: Any, blocks: np.ndarray) -> float:
    total, count = 0.0, 0
    for block in blocks:
        nll, n = _nll_from_logits(llama_logits(llm, block), block)
        total, count = total + nll, count + n
    return float(np.exp(total / count))


def torch_perplexity(model_dir: Path, blocks: np.ndarray) -> float:
    """The merged PyTorch model's perplexity (fp32, CPU), computed exactly as ``rawtune eval`` does."""
    import torch

    from .evaluate import perplexity
    from .models import load_causal_lm

    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    try:
        return perplexity(model, blocks)
    finally:
        del model


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
                prompt: str, n_ctx: int) -> dict[str, Any]:
    """Load one GGUF in llama.cpp: tokenization check, greedy sample and held-out perplexity."""
    started = time.time()
    llm = load_llama(path, n_ctx, logits_all=blocks is not None)
    try:
        mismatches = check_tokenizer(llm, tokenizer, texts)
        out = llm.create_completion(prompt, max_tokens=GREEDY_TOKENS, temperature=0.0, top_k=1)
        sample = out["choices"][0]["text"]
        ppl = llama_perplexity(llm, blocks) if blocks is not None else None
    finally:
        llm.close()
    return {"ppl": None if ppl is None else round(ppl, 4), "tokenizer_ok": not mismatches,
            "tokenizer_mismatches": mismatches[:5], "sample": sample,
            "verify_seconds": round(time.time() - started, 2)}


# ---------------------------------------------------------------- the stage


def _heldout_blocks(run: RunDir, log: Callable[[str], None]) -> Optional[np.ndarray]:
    """The held-out blocks ``rawtune eval`` scores (None when the run has none)."""
    from .evaluate import scoring_blocks

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


def _warn(log: Callable[[str], None], text: str, warnings: list[str]) -> None:
    warnings.append(text)
    bar = "!" * 72
    log(f"[export] {bar}\n[export] WARNING: {text}\n[export] {bar}")


def _calibration_blocks(run: RunDir, settings: ExportSettings, labels: list[str],
                        log: Callable[[str], None]) -> Optional[np.ndarray]:
    """Training blocks for the importance matrix, or None when no file takes one or none is asked for."""
    from .imatrix import pick_blocks

    if settings.imatrix_blocks <= 0 or not any(quants_table.get(label).imatrix for label in labels):
        return None
    path = run.data_dir / "train.npy"
    if not path.is_file():
        log(f"[export] {path} not found: quantizing without an importance matrix")
        return None
    blocks = pick_blocks(np.load(path, mmap_mode="r"), settings.imatrix_blocks)
    return np.asarray(blocks, dtype=np.int64) if len(blocks) else None


def _quantize_one(f16: Path, target: Path, label: str, imatrix: Any, work_dir: Path,
                  log_path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One quantized file: llama.cpp's, then (k-quants with a matrix) re-quantized with the matrix."""
    from . import imatrix as imatrix_mod

    weighted = imatrix is not None and quants_table.get(label).imatrix
    out = work_dir / f"{target.stem}.default.gguf" if weighted else target
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds, fallback = quantize(f16, out, label, log_path)
    entry: dict[str, Any] = {"file": target.name, "imatrix_tokens": imatrix.tokens if weighted else 0}
    note = ""
    if weighted:
        t0 = time.time()
        try:
            count = imatrix_mod.quantize_file(f16, out, target, imatrix, cpu_threads())
        finally:
            out.unlink(missing_ok=True)
        entry["seconds_weighting"] = round(time.time() - t0, 2)
        seconds += entry["seconds_weighting"]
        note = f", {count} tensors weighted by the importance matrix"
    entry.update(bytes=target.stat().st_size, seconds=round(seconds, 2), fallback=fallback)
    log(f"[export] quantized {target.name} ({entry['bytes'] / 2**20:.1f} MiB) in {seconds:.1f}s{note}")
    if fallback:
        log(f"[export] {label}: {fallback} (llama.cpp's log: {LOG_FILE})")
    return entry


def export_run(run: RunDir, settings: ExportSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge, convert, quantize and verify; write the Ollama files; record ``gguf`` and ``export``.

    On any failure the F16 work file and half-written GGUFs are removed: a full disk must not
    stay full, and a later export must not mistake a fragment for a finished file.
    """
    try:
        with run.lock():  # also when called directly (the app), not only through the pipeline
            return _export(run, settings, log)
    except BaseException as exc:
        _remove_work_files(run, file_stem(run, settings.name))
        if isinstance(exc, OSError):
            raise ExportError(f"writing the GGUF files in {run.path} failed ({exc.strerror or exc}); free disk "
                              f"space there (the F16 file needs about 2 bytes per parameter) and export again") from None
        raise


def _remove_work_files(run: RunDir, stem: str) -> None:
    work_dir = run.path / "gguf_work"
    for path in [*work_dir.glob(f"{stem}.F16.gguf*"), *run.gguf_dir.glob(f"{stem}.*.gguf.partial")]:
        path.unlink(missing_ok=True)
    if work_dir.is_dir() and not any(work_dir.iterdir()):
        work_dir.rmdir()


def _export(run: RunDir, settings: ExportSettings, log: Callable[[str], None]) -> dict[str, Any]:
    from . import gguf_writer, ollama
    from .merge import merge_run

    labels = _label_list(list(settings.quant))
    stem = file_stem(run, settings.name)
    started = time.time()
    merged = Path(merge_run(run, log=log))
    seconds_merge = time.time() - started

    record = run.load()
    fingerprint = _fingerprint(merged, stem)
    previous = record.get("gguf") or {}
    prev_export = record.get("export") or {}
    reusable = prev_export.get("fingerprint") == fingerprint
    out_dir = run.gguf_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    def target(label: str) -> Path:
        return out_dir / f"{stem}.{label}.gguf"

    calibration = _calibration_blocks(run, settings, labels, log)

    def wanted_imatrix_tokens(label: str) -> int:
        return int(calibration.size) if calibration is not None and quants_table.get(label).imatrix else 0

    def current(label: str) -> bool:
        info = previous.get(label) or {}
        path = target(label)
        return (reusable and path.is_file() and info.get("bytes") == path.stat().st_size
                and (info.get("imatrix_tokens") or 0) == wanted_imatrix_tokens(label))

    gguf: dict[str, dict[str, Any]] = {k: v for k, v in previous.items() if k in labels and current(k)}
    for label in gguf:
        log(f"[export] {target(label).name} is up to date")
    todo = [label for label in labels if label not in gguf]

    # F16 from rawtune's writer: the requested F16 file itself, or a work file for the quantizer.
    work_dir = run.path / "gguf_work"
    f16 = target("F16") if "F16" in labels else work_dir / f"{stem}.F16.gguf"
    seconds_convert = 0.0
    conversion = prev_export.get("conversion") if reusable else None
    if todo:
        t0 = time.time()
        conversion = gguf_writer.convert(merged, f16, "f16", name=stem,
                                         license=(record.get("model") or {}).get("license"), log=log)
        seconds_convert = time.time() - t0
        log(f"[export] wrote F16 GGUF ({conversion['tensors']} tensors, {conversion['tokenizer']} tokenizer"
            f"{', pre-tokenizer ' + conversion['pre_tokenizer'] if conversion['pre_tokenizer'] else ''}) "
            f"in {seconds_convert:.1f}s")
        if "F16" in todo:
            gguf["F16"] = {"file": f16.name, "bytes": f16.stat().st_size, "seconds": round(seconds_convert, 2)}

    imatrix = None
    seconds_imatrix = 0.0
    if calibration is not None and any(wanted_imatrix_tokens(label) for label in todo):
        from .imatrix import compute

        imatrix = compute(merged, calibration, source="data/train.npy (training blocks, spread evenly)")
        seconds_imatrix = imatrix.seconds
        log(f"[export] importance matrix from {imatrix.tokens:,} training tokens ({imatrix.blocks} blocks of "
            f"data/train.npy, {len(imatrix.values)} weights) in {seconds_imatrix:.1f}s")
    seconds_quantize = 0.0
    for label in todo:
        if label == "F16":
            continue
        gguf[label] = _quantize_one(f16, target(label), label, imatrix, work_dir, run.path / LOG_FILE, log)
        seconds_quantize += gguf[label]["seconds"]
    if work_dir.is_dir() and not any(work_dir.iterdir()):
        work_dir.rmdir()  # held only the default quantizations the importance matrix replaced
    for label in todo:
        gguf[label]["tensor_types"] = tensor_types(target(label))

    # ---- verification (timed separately from the export itself)
    warnings: list[str] = []
    ppl_merged = prev_export.get("ppl_merged") if reusable else None
    ppl_f16 = prev_export.get("ppl_f16") if reusable else None
    blocks_used = prev_export.get("ppl_blocks") if reusable else None
    t0 = time.time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    config = gguf_writer.read_json(merged / "config.json")
    blocks = _heldout_blocks(run, log) if settings.verify else None
    shape = None if blocks is None else [int(blocks.shape[0]), int(blocks.shape[1])]
    if settings.verify and shape != blocks_used:  # other blocks than the earlier export scored: score all again
        ppl_merged = ppl_f16 = None
        for label in labels:
            gguf[label].pop("verify_seconds", None)
    to_verify = [label for label in labels if "verify_seconds" not in gguf[label]] if settings.verify else []
    if to_verify:
        texts, prompt = _check_texts(tokenizer, blocks)
        n_ctx = int(blocks.shape[1]) if blocks is not None else 512
        blocks_used = shape
        if blocks is not None and ppl_merged is None:
            ppl_merged = round(torch_perplexity(merged, blocks), 4)
            log(f"[export] merged PyTorch model: perplexity {ppl_merged:.4f} on {blocks.shape[0]} held-out blocks"
                + _tuned_note(record, shape))
        check = list(to_verify)
        if blocks is not None and "F16" not in labels and f16.is_file():
            check.append("F16 (work file)")  # separates conversion error from quantization loss
        for label in check:
            path = f16 if label.startswith("F16") else target(label)
            result = verify_file(path, tokenizer, blocks, texts, prompt, n_ctx)
            if label.startswith("F16"):
                ppl_f16 = result["ppl"]
            if label in gguf:
                gguf[label].update(result)
            log(f"[export] llama.cpp {label}: perplexity {_ppl_text(result['ppl'], ppl_merged)}, tokenizer "
                f"{'agrees' if result['tokenizer_ok'] else 'DIFFERS'}, greedy {result['sample']!r}")
            if not result["tokenizer_ok"]:
                _warn(log, f"{label}: llama.cpp tokenizes differently from the HF tokenizer: "
                           f"{'; '.join(result['tokenizer_mismatches'][:2])}", warnings)
    checked = {label: gguf[label] for label in labels}
    if "F16" not in labels and ppl_f16 is not None:
        checked["F16"] = {"ppl": ppl_f16}  # the work file: a rise here is the writer's fault
    for label, entry in checked.items():
        ppl = entry.get("ppl")
        if ppl is not None and ppl_merged:
            rise = 100.0 * (ppl / ppl_merged - 1.0)
            entry["ppl_increase_pct"] = round(rise, 3)
            bound = quants_table.get(label).bound_pct
            if bound is not None and rise > bound:
                _warn(log, f"{label} perplexity {ppl:.4f} is {rise:+.2f}% over the merged model's "
                           f"{ppl_merged:.4f} (bound {bound}%): that is a conversion bug, not "
                           f"quantization noise", warnings)
    seconds_verify = time.time() - t0 if to_verify else 0.0
    if f16.parent == work_dir and f16.is_file():
        f16.unlink()  # only the quantizer needed it; the requested files are in gguf/
        if not any(work_dir.iterdir()):
            work_dir.rmdir()

    for label in set(quants_table.EXPORTABLE_LABELS) - set(labels):
        if target(label).is_file():  # from an earlier export with other --quant: not published now
            target(label).unlink()
            log(f"[export] removed {target(label).name} (not in --quant this time)")

    # ---- the files Ollama reads
    first = min(labels, key=quants_table.sort_key)  # smallest file first, in the table's order
    add_bos = bool((conversion or {}).get("add_bos", False))
    fmt = ollama.chat_format_for(tokenizer, add_bos, log=log)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    context = int(config.get("max_position_embeddings") or 2048)
    written = ollama.write_files(out_dir, target(first).name, fmt, tokenizer.eos_token, specials, context)
    log(f"[export] wrote {', '.join(written['files'])} ({written['template']} template, stops {written['stop']})")

    reused = [label for label in labels if label not in todo]
    if not todo and reusable:
        # Nothing was rebuilt: keep the times of the export that made these files.
        seconds_convert = prev_export.get("seconds_convert", 0.0)
        seconds_quantize = prev_export.get("seconds_quantize", 0.0)
        seconds_verify = seconds_verify or prev_export.get("seconds_verify", 0.0)
    if imatrix is not None:
        imatrix_info = imatrix.summary()
    elif any(gguf[label].get("imatrix_tokens") for label in labels):
        imatrix_info = prev_export.get("imatrix")  # the weighted files were reused
        seconds_imatrix = (imatrix_info or {}).get("seconds", 0.0)
    else:
        imatrix_info = None
    export = {
        "dir": out_dir.name,
        "name": stem,
        "seconds_merge": round(seconds_merge, 2),
        "seconds_convert": round(seconds_convert, 2),
        "seconds_quantize": round(seconds_quantize, 2),
        "seconds_verify": round(seconds_verify, 2),
        "seconds_imatrix": round(seconds_imatrix, 2),
        "imatrix": imatrix_info,
        "log": LOG_FILE if (run.path / LOG_FILE).is_file() else None,
        "reused": reused,
        "files": [gguf[label]["file"] for label in labels] + written["files"],
        "ppl_merged": ppl_merged,
        "ppl_f16": ppl_f16 if "F16" not in labels else gguf["F16"].get("ppl"),
        "ppl_blocks": blocks_used,
        "template": written["template"],
        "stop": written["stop"],
        "conversion": conversion,
        "fingerprint": fingerprint,
        "warnings": warnings,
    }
    run.update(gguf={label: gguf[label] for label in labels}, export=export)
    total = seconds_merge + seconds_convert + seconds_imatrix + seconds_quantize
    log(f"[export] done: merge {seconds_merge:.1f}s + convert {seconds_convert:.1f}s + importance matrix "
        f"{seconds_imatrix:.1f}s + quantize {seconds_quantize:.1f}s = {total:.1f}s; verification {seconds_verify:.1f}s"
        + (f" (reused {', '.join(reused)} from the previous export)" if reused else ""))
    return export
