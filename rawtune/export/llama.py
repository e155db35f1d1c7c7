"""llama.cpp through llama-cpp-python: the one place that opens a GGUF file, its thread count, and
where its log goes while it quantizes.

Export verifies every file it writes here (on the CPU), and Compare generates from a published
quant here (on the GPU where llama.cpp was built with one). Both get the same errors: a missing
llama-cpp-python, or a file llama.cpp cannot load, is an :class:`ExportError` saying what to do.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ExportError


def llama_cpp() -> Any:
    """The llama_cpp module, or an ExportError saying how to install it."""
    try:
        import llama_cpp as module
    except ImportError:
        raise ExportError("GGUF quantization, verification and the GGUF side of Compare need llama-cpp-python: "
                          "`pip install llama-cpp-python==0.3.36` (or pip install 'rawtune[gguf]')") from None
    return module


def cpu_threads() -> int:
    """Threads for llama.cpp: the idle cores, at least one.

    llama.cpp's threads wait for each other at every layer, so on a shared machine (a Space, or
    training running beside export) asking for busy cores makes it several times slower.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # The fewest of a few looks 10 ms apart: a process that is busy stays busy, a thread that just
    # finished a burst of work does not.
    busy = _other_runnable()
    for _ in range(SAMPLES - 1):
        if busy == 0:
            break
        time.sleep(0.01)
        busy = min(busy, _other_runnable())
    return max(1, min(cores, cores - busy))


SAMPLES = 5


def _other_runnable() -> int:
    """Tasks of other processes running right now.

    The instantaneous count from /proc/loadavg, not the 1-minute load average: that average still
    counts rawtune's own training that has just finished, and would leave llama.cpp one thread.
    This process's own running threads are taken off the count: right after torch or numpy work
    their idle pool threads spin for a moment and show as running, and counting them scored the
    keep check's two files one after the other on one core (69 s instead of 33 s on 2 cores).
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        try:
            return max(0, int(os.getloadavg()[0]) - 1)
        except OSError:  # not available on this platform
            return 0
    return max(0, running - _own_running())


def _own_running() -> int:
    """This process's threads in the running state (this one included), at least one."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as handle:
                # The state follows the parenthesised command name, which may itself hold spaces.
                count += handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(1, count)


# llama-cpp-python points the process's stdout/stderr at /dev/null while it loads a model (verbose
# off) and back afterwards: two loads at once could leave them pointing there, so loads take turns.
_LOAD_LOCK = threading.Lock()


@contextmanager
def llama_log(path: Optional[Path], title: str) -> Iterator[list[str]]:
    """Send llama.cpp's log to a list (appended to ``path`` afterwards, if given) instead of the console.

    llama.cpp logs a line or two per tensor while quantizing (a fallback warning for most tensors
    of a small model); the caller turns those into one summary line.
    """
    cpp = llama_cpp()
    import llama_cpp._logger as cpp_logger  # llama-cpp-python's own callback, restored afterwards

    chunks: list[str] = []

    @cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        cpp.llama_log_set(cpp_logger.llama_log_callback, ctypes.c_void_p(0))
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"==== {title} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{''.join(chunks)}\n")


def load_llama(path: Path, n_ctx: int, logits_all: bool = False, f32_cache: bool = False,
               gpu: bool = False, n_threads: Optional[int] = None) -> Any:
    """Open a GGUF with llama.cpp (callers ``close()`` it, or keep it cached).

    ``f32_cache`` keeps the KV cache in float32 instead of llama.cpp's default F16, for
    comparisons with PyTorch at float32 tolerance. ``gpu`` offloads every layer where llama.cpp
    has a GPU (generation); verification stays on the CPU so its numbers do not depend on a card.
    ``n_threads``: llama.cpp's threads (default :func:`cpu_threads`; export splits them between the
    files it scores at once). Safe to call from several threads.
    """
    cpp = llama_cpp()
    cache = {"type_k": cpp.GGML_TYPE_F32, "type_v": cpp.GGML_TYPE_F32} if f32_cache else {}
    threads = n_threads or cpu_threads()
    try:
        with _LOAD_LOCK:
            # n_threads_batch too: it defaults to every core, and scoring a block is a batch.
            return cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                             n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1 if gpu else 0,
                             verbose=False, **cache)
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError for bad files
        raise ExportError(f"llama.cpp could not load {path.name}: {exc}; export it again, and if a fresh "
                          f"export fails the same way the conversion is broken: report it with the model's "
                          f"config.json") from None
