"""Long work behind the page: threads whose log lines stream to it, the GPU line, page-fit errors.

Every :class:`~rawtune.errors.RawtuneError` reaches the page as a ``gr.Error`` with its message;
an unexpected exception shows its type and message (tokens masked) while the traceback goes to
the server log only. GPU work runs inside ``@spaces.GPU`` functions on Hugging Face Spaces (plain
functions anywhere else) and takes turns on the GPU in ``space.SLOT``; a waiting visitor sees what
runs now and a rough wait. A visitor holds one place there at a time (:func:`gpu_place`). Data
loads run in a pool of their own (:func:`in_load_pool`), a few per visitor at most, so they
neither hold Gradio's worker threads nor keep other visitors' loads waiting behind them.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from .. import space
from ..errors import RawtuneError
from ..rundir import scrub
from .session import Session, runs_root

LOG_LINES = 200  # log lines kept on the page
TICK = 0.5  # seconds between page updates while a long task streams progress
_LOAD_POOL = ThreadPoolExecutor(space.LOAD_WORKERS, thread_name_prefix="rawtune-load")


def gpu(duration: int) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on Spaces; leaves the function as it is anywhere else."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def public(text: str) -> str:
    """A message fit for the page: tokens masked, the server's folders cut out of paths."""
    return space.hide_paths(scrub(text), [runs_root()])


def friendly(exc: BaseException) -> BaseException:
    """A page-friendly error: rawtune's own message, or the type and message of anything else.

    GeneratorExit and KeyboardInterrupt pass through untouched: they are not errors to show."""
    if isinstance(exc, (gr.Error, GeneratorExit, KeyboardInterrupt)):
        return exc
    if isinstance(exc, RawtuneError):
        return gr.Error(public(str(exc)))
    # The server log gets the traceback, with tokens masked too.
    print(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))), end="", file=sys.stderr)
    return gr.Error(public(f"Unexpected {type(exc).__name__}: {exc}. Details are in the server log."))


def append(log: list[str], line: str) -> str:
    """Add a line to a page log (paths inside the runs folder shown relative to it); the log's text."""
    log.append(public(line.rstrip()))
    del log[:-LOG_LINES]
    return "\n".join(log)


class Background:
    """Runs ``fn(log=...)`` in a thread; the handler polls it to stream log lines."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            self.result = fn(*args, log=lambda line: self.events.put({"type": "log", "line": str(line)}), **kwargs)
        except BaseException as exc:  # handed to the handler thread, which shows it in the page
            self.error = exc
        finally:
            self.done.set()

    def poll(self, timeout: float = TICK) -> list[dict]:
        """Events that arrived within ``timeout`` seconds (all of them once the work is done)."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout))
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return out

    def finished(self) -> bool:
        return self.done.is_set() and self.events.empty()

    def raise_error(self) -> None:
        if self.error is not None:
            raise friendly(self.error)


def stream_log(work: Background, log: list[str]) -> Iterator[str]:
    """The page log's text after each poll, until the work is done."""
    while not work.finished():
        for event in work.poll():
            append(log, event["line"])
        yield "\n".join(log)


def wait_for_gpu(ticket: "space.Ticket", gone: Callable[[], bool]) -> Iterator[str]:
    """Yield what is ahead of ``ticket`` (position, what runs now, a rough wait) until it holds
    the GPU; returns early once ``gone()`` (the visitor stopped or left)."""
    while not space.SLOT.my_turn(ticket) and not gone():
        yield space.SLOT.describe(ticket)
        time.sleep(TICK)


class GpuTurn:
    """One session's training in the app's GPU line: its ticket and its time budget."""

    def __init__(self, session: Session):
        self.session = session
        self.ticket: Optional[space.Ticket] = None
        self.over: Optional[str] = None  # why the budget stopped the training, if it did

    def wait(self) -> Iterator[str]:
        """Join the line; yield what is ahead until this training holds the GPU (or was stopped)."""
        self.ticket = space.SLOT.join("training", self.session.dir.name)
        yield from wait_for_gpu(self.ticket, lambda: self.session.stop.is_set() or self.session.closed)

    def holds(self) -> bool:
        return self.ticket is not None and space.SLOT.my_turn(self.ticket)

    def time_up(self) -> Optional[str]:
        """Once the budget's time is used up: stop after this step, as the Stop button does."""
        if self.ticket is None or not self.ticket.started or self.over is not None:
            return None
        self.over = space.SLOT.budget.time_up(time.time() - self.ticket.started)
        if self.over:
            self.session.stop.set()
            self.session.run.stop_file.touch()
        return self.over

    def report(self, event: dict) -> None:
        if self.ticket is not None:
            space.SLOT.report(self.ticket, event["step"], event["max_steps"], event.get("eta_s"))

    def leave(self) -> None:
        if self.ticket is not None:
            space.SLOT.leave(self.ticket)


async def in_load_pool(visitor: Optional[str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the app's data-load pool, counted against ``visitor``'s loads in flight
    (one page-fit line when they have as many running as a visitor may)."""
    try:
        with space.LOADS.hold(visitor):
            return await asyncio.wrap_future(_LOAD_POOL.submit(fn, *args))
    except BaseException as exc:
        raise friendly(exc) from None


@contextmanager
def gpu_place(visitor: Optional[str]) -> Iterator[None]:
    """``visitor``'s place in the GPU line (``space.SLOT``) while the block runs: a training from
    Start to its end, data stage included, an export or a Compare; a second one is refused."""
    slot = space.SLOT
    try:
        slot.places.take(visitor)
    except BaseException as exc:
        raise friendly(exc) from None
    try:
        yield
    finally:
        slot.places.give_back(visitor)
