"""The data stage: raw documents in, packed token blocks and a held-out split out.

Documents (read by :mod:`rawtune.data.files`) are stripped, filtered by length, deduplicated,
tokenized with EOS appended, split at document level into train and held-out, and packed into
fixed-length blocks saved as ``.npy`` arrays.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ..errors import DataError
from ..rundir import RunDir
from ..settings import DataSettings
from .files import read_documents


@dataclass
class DataReport:
    """What the data stage did, stored in run.json under ``data``."""

    source: str
    column: Optional[str]
    column_reason: str
    documents_read: int
    documents_kept: int
    dropped_empty: int
    dropped_short: int
    dropped_duplicate: int
    train_documents: int
    heldout_documents: int
    train_tokens: int
    heldout_tokens: int
    train_blocks: int
    heldout_blocks: int
    seq_len: int
    tokens_dropped_by_packing: int
    documents_cut: int = 0  # documents whose head is trained on and whose tail is held out

    def summary(self) -> str:
        dropped = self.dropped_empty + self.dropped_short + self.dropped_duplicate
        cut = f"; {self.documents_cut} long document cut: its tail is held out" if self.documents_cut else ""
        return (
            f"{self.source}: column {self.column or '(plain text)'} ({self.column_reason}); "
            f"{self.documents_kept}/{self.documents_read} documents kept "
            f"({dropped} dropped: {self.dropped_empty} empty, {self.dropped_short} short, "
            f"{self.dropped_duplicate} duplicate); {self.train_tokens:,} train tokens in "
            f"{self.train_blocks} blocks of {self.seq_len}, {self.heldout_blocks} held-out blocks{cut}"
        )


# ---------------------------------------------------------------- cleaning, tokenizing, packing


def clean(texts: Iterable[str], min_chars: int, dedupe: bool) -> tuple[list[str], dict[str, int]]:
    """Strip, drop empty/short documents and exact duplicates; count what was dropped."""
    kept: list[str] = []
    seen: set[bytes] = set()
    counts = {"documents_read": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 0}
    for text in texts:
        counts["documents_read"] += 1
        text = text.strip()
        if not text:
            counts["dropped_empty"] += 1
            continue
        if len(text) < min_chars:
            counts["dropped_short"] += 1
            continue
        if dedupe:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                counts["dropped_duplicate"] += 1
                continue
            seen.add(digest)
        kept.append(text)
    return kept, counts


def tokenize(texts: list[str], tokenizer: Any, batch: int = 256) -> list[list[int]]:
    """Token ids of each document with EOS appended (and BOS first where the model uses one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; rawtune appends EOS to every document")
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    out: list[list[int]] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            out.append(([bos] if bos is not None else []) + list(ids) + [eos])
    return out


def pack(docs: list[list[int]], seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents and cut them into full blocks; return blocks and leftover tokens."""
    flat = np.fromiter((t for d in docs for t in d), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len), int(len(flat) - n * seq_len)


def split_documents(docs: list[list[int]], fraction: float, min_tokens: int, seed: int,
                    piece_tokens: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Hold out whole documents (a seeded shuffle) until both the share and the minimum are met.

    The document that would overshoot is cut in pieces of ``piece_tokens`` (0: never cut) and only
    as many of its last pieces as are needed are held out: one book or one long dump can then be
    trained on, and its held-out part stays one contiguous tail, never interleaved with training text.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for d in docs)
    need = max(int(total * fraction), min_tokens)
    held: dict[int, list[int]] = {}
    train_part: dict[int, list[int]] = {}
    got = 0
    for i in order:
        if got >= need:
            break
        doc = docs[i]
        cut = _tail_cut(len(doc), need - got, piece_tokens)
        if cut > 0:
            train_part[i] = doc[:cut]
        held[i] = doc[cut:]
        got += len(held[i])
    train = [train_part.get(i, d) for i, d in enumerate(docs) if i not in held or i in train_part]
    return train, [held[i] for i in sorted(held)]


def _tail_cut(length: int, wanted: int, piece_tokens: int) -> int:
    """Where to cut a document so its last whole pieces cover ``wanted`` tokens (0: hold it all out)."""
    if piece_tokens <= 0 or length <= wanted:
        return 0
    pieces = -(-wanted // piece_tokens)
    return max(length - pieces * piece_tokens, 0)


def prepare(settings: DataSettings, tokenizer: Any, seq_len: int, run: RunDir,
            seed: int = 3407, token: Optional[str] = None,
            log: Callable[[str], None] = print) -> DataReport:
    """Run the whole data stage and write ``data/train.npy`` and ``data/heldout.npy``."""
    docs = read_documents(settings, token=token)
    log(f"[data] read {len(docs.texts)} documents from {docs.source}; text column: "
        f"{docs.column or '(plain text)'} ({docs.column_reason})")
    kept, counts = clean(docs.texts, settings.min_chars, settings.dedupe)
    if not kept:
        raise DataError(
            f"nothing left after cleaning {docs.source}: {counts['documents_read']} documents read, "
            f"{counts['dropped_empty']} empty, {counts['dropped_short']} shorter than --min-chars "
            f"{settings.min_chars}; lower --min-chars or check --text-column"
        )
    ids = tokenize(kept, tokenizer)
    total = sum(len(d) for d in ids)
    min_held = settings.min_heldout_blocks * seq_len
    if total < min_held + seq_len:
        raise DataError(
            f"corpus too small: {total} tokens after cleaning, but one training block plus "
            f"{settings.min_heldout_blocks} held-out blocks of --seq-len {seq_len} need "
            f"{min_held + seq_len}; add text or lower --seq-len"
        )
    piece = seq_len if settings.piece_tokens is None else settings.piece_tokens
    train_docs, held_docs = split_documents(ids, settings.heldout_fraction, min_held, seed, piece)
    train_blocks, train_left = pack(train_docs, seq_len)
    held_blocks, held_left = pack(held_docs, seq_len)
    if len(train_blocks) == 0:
        hint = " or let long documents be cut (drop --piece-tokens 0)" if piece == 0 else ""
        raise DataError(f"no full training block of --seq-len {seq_len} is left after the held-out split; "
                        f"add text or lower --seq-len / --heldout-fraction{hint}")
    save_blocks(run, {"train": train_blocks, "heldout": held_blocks})
    report = DataReport(
        source=docs.source, column=docs.column, column_reason=docs.column_reason,
        documents_kept=len(kept), train_documents=len(train_docs), heldout_documents=len(held_docs),
        train_tokens=int(train_blocks.size), heldout_tokens=int(held_blocks.size),
        train_blocks=len(train_blocks), heldout_blocks=len(held_blocks), seq_len=seq_len,
        tokens_dropped_by_packing=train_left + held_left,
        documents_cut=len(train_docs) + len(held_docs) - len(ids), **counts,
    )
    run.update(data=asdict(report))
    log(f"[data] {report.summary()}")
    return report


def save_blocks(run: RunDir, arrays: dict[str, np.ndarray]) -> None:
    """Write ``data/<name>.npy`` for each array, all complete or none: each goes to a hidden name
    first and all are renamed once every one is written, so a full disk (or a kill) never leaves a
    cut-off ``.npy``, nor a new train.npy beside an old heldout.npy."""
    partial = {name: run.data_dir / f".{name}.npy.partial" for name in arrays}
    try:
        run.data_dir.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            with partial[name].open("wb") as handle:
                np.save(handle, array)
    except OSError as exc:
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise DataError(f"writing the packed blocks to {run.data_dir} failed ({exc.strerror or exc}); free "
                        "disk space there, or give another --out") from None
    except BaseException:
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in partial.items():
        os.replace(path, run.data_dir / f"{name}.npy")


def load_blocks(run: RunDir, which: str) -> np.ndarray:
    """Load ``train`` or ``heldout`` blocks written by :func:`prepare`."""
    path = run.data_dir / f"{which}.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing: run the data stage first (`rawtune train` does it)")
    return np.load(path)


def preview(settings: DataSettings, n: int = 5, token: Optional[str] = None) -> dict[str, Any]:
    """Read a source and report its column choice, cleaning counts and first documents (for the UI)."""
    docs = read_documents(settings, token=token)
    kept, counts = clean(docs.texts, settings.min_chars, settings.dedupe)
    return {
        "source": docs.source, "column": docs.column, "column_reason": docs.column_reason,
        "columns": docs.columns, "documents_kept": len(kept), "characters": sum(map(len, kept)),
        "first": kept[:n], **counts,
    }
