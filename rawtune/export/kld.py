"""KL divergence of a GGUF's next-token distributions from the merged model's, token by token.

What quantizers compare files by (llama.cpp's ``perplexity --kl-divergence``): for every scored
position, KL(P_merged || Q_file) over the whole vocabulary, reported as the mean, the 99th
percentile, and how often both models put the same token first.

Export gets both sides from passes it already makes: the merged PyTorch model's logits from its
held-out perplexity pass (:class:`ReferenceStore` keeps them, compressed, in a file beside the
work files, since the PyTorch model is freed before llama.cpp opens a GGUF), and each file's
logits from llama.cpp's perplexity pass over the same blocks (:class:`Scorer` takes them block by
block). No model runs twice.

Storage: a log-probability per vocabulary entry as a 16-bit code over the row's top
:data:`RANGE` nats (one step is 3.7e-4 nats, an error of at most half that; llama.cpp's own
kl-divergence file stores 16-bit codes too); anything less probable is stored at the bottom of the
range (e^-24 of the top token's probability: 49k such tokens add up to 2e-6). 512-token blocks of a
49k vocabulary take 50 MB each. With each row's normaliser, entropy and top token kept beside the
codes, a file's divergence is KL = Σ p log p − Σ p x + logsumexp(x) over its logits x: one
exponential per entry on each side, a few passes over the logits per file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

RANGE = 24.0  # nats below the row's most likely token that are kept
_STEPS = 65535  # codes 0..65535
_SCALE = RANGE / _STEPS
P99 = 99.0
# Positions handled at once: the float32 temporaries of a chunk stay near 100 MB even for a
# 152k vocabulary (a whole 512-token block would take several times that on top of the model).
CHUNK = 128


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (float32 in, float32 out; the sums in float64)."""
    x = np.asarray(x, dtype=np.float32)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x - top - lse


def encode(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 codes, float32 lower end per row) for ``[..., vocab]`` log-probabilities."""
    lo = logprobs.max(axis=-1, keepdims=True) - RANGE
    codes = np.rint((logprobs - lo) * np.float32(1.0 / _SCALE))
    return np.clip(codes, 0, _STEPS).astype(np.uint16), lo[..., 0].astype(np.float32)


def decode(codes: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Probabilities ``exp(offset + code * step)`` per row (``offset``: the row's lower end minus
    the log of its normaliser, so that a row sums to one)."""
    probs = codes.astype(np.float32)
    probs *= np.float32(_SCALE)
    probs += offset[..., None].astype(np.float32)
    return np.exp(probs, out=probs)


def row_stats(codes: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset for :func:`decode`, Σ p log p, top token) of each stored row."""
    probs = decode(codes, lo)
    total = probs.sum(axis=-1, dtype=np.float64)
    offset = lo - np.log(total)
    probs /= total[:, None].astype(np.float32)
    logprobs = codes.astype(np.float32) * np.float32(_SCALE) + offset[:, None].astype(np.float32)
    neg_entropy = np.einsum("ij,ij->i", probs, logprobs, dtype=np.float64)
    return offset.astype(np.float32), neg_entropy, codes.argmax(axis=-1)


class ReferenceStore:
    """The merged model's log-probabilities at every predicting position of the scored blocks
    (``[blocks, seq_len - 1, vocab]``), written once and read by every file's check."""

    def __init__(self, path: Path, blocks: int, seq_len: int, vocab: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.codes = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint16,
                                               shape=(blocks, seq_len - 1, vocab))
        self.offset = np.zeros((blocks, seq_len - 1), dtype=np.float32)
        self.neg_entropy = np.zeros((blocks, seq_len - 1), dtype=np.float64)
        self.top = np.zeros((blocks, seq_len - 1), dtype=np.int64)

    def add(self, first: int, logits: np.ndarray) -> None:
        """Logits ``[batch, seq_len, vocab]`` of blocks ``first``, ``first + 1``, ...; the last
        position predicts nothing that is scored and is dropped."""
        for i, row in enumerate(np.asarray(logits, dtype=np.float32)):
            for start in range(0, row.shape[0] - 1, CHUNK):
                part = slice(start, min(start + CHUNK, row.shape[0] - 1))
                codes, lo = encode(log_softmax(row[part]))
                self.codes[first + i, part] = codes
                stats = row_stats(codes, lo)
                self.offset[first + i, part], self.neg_entropy[first + i, part], self.top[first + i, part] = stats

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.codes[index], self.offset[index], self.neg_entropy[index], self.top[index]

    def close(self) -> None:
        """Flush and delete the file (export keeps the numbers, not the logits)."""
        del self.codes
        self.path.unlink(missing_ok=True)


def store_reference(model: Any, blocks: np.ndarray, path: Path, batch: int) -> tuple[ReferenceStore, float]:
    """The merged model's perplexity on ``blocks`` (``rawtune eval``'s pass), its log-probabilities
    stored at ``path`` as the pass makes them (the vocabulary width is known from the first batch).
    A pass that fails leaves no file."""
    from ..evaluate import perplexity

    stores: list[ReferenceStore] = []

    def keep(first: int, logits: np.ndarray) -> None:
        if not stores:
            stores.append(ReferenceStore(path, int(len(blocks)), int(blocks.shape[1]), int(logits.shape[-1])))
        stores[0].add(first, logits)

    try:
        ppl = perplexity(model, blocks, batch, on_logits=keep)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores[0], ppl


def block_kld(codes: np.ndarray, offset: np.ndarray, neg_entropy: np.ndarray, top: np.ndarray,
              logits: np.ndarray, lse: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(KL(P || Q) per position, whether the top tokens agree) for one block: P from the stored
    reference (:meth:`ReferenceStore.block`), Q from the file's logits ``[seq_len, vocab]``.

    ``lse``: the log-sum-exp of each scored row of ``logits``, where the caller has it already (the
    perplexity pass computes it; the exponentials over the vocabulary are most of this function's
    time). When the two vocabularies differ in width (an embedding padded on one side only), both are
    compared on the columns they share, each renormalised over them, and ``lse`` is not used.
    """
    x = np.asarray(logits[:-1], dtype=np.float32)
    if codes.shape[-1] != x.shape[-1]:
        n = min(codes.shape[-1], x.shape[-1])
        codes, x = codes[:, :n], x[:, :n]
        offset, neg_entropy, top = row_stats(codes, offset)  # renormalised over the shared columns
        lse = None
    p = decode(codes, offset)
    same = top == x.argmax(axis=-1)
    peak = x.max(axis=-1)
    x = x - peak[:, None]
    # Σ p (x - max x): its terms are small (p is tiny wherever x - max x is large), so float32 sums it.
    cross = np.einsum("ij,ij->i", p, x)
    if lse is None:
        shifted_lse = np.log(np.exp(x, out=x).sum(axis=-1, dtype=np.float64))
    else:
        shifted_lse = np.asarray(lse, dtype=np.float64) - peak
    kld = neg_entropy - cross + shifted_lse
    return np.maximum(kld, 0.0), same


class Scorer:
    """Collects one file's per-token KL divergences, block by block, from the stored reference."""

    def __init__(self, reference: ReferenceStore) -> None:
        self.reference = reference
        self.klds: list[np.ndarray] = []
        self.same: list[np.ndarray] = []

    def add(self, index: int, logits: np.ndarray, lse: Optional[np.ndarray] = None) -> None:
        """Logits ``[seq_len, vocab]`` of block ``index`` (the last position is not scored), and
        optionally the log-sum-exp of each scored row (``[seq_len - 1]``) where it is known."""
        codes, offset, neg_entropy, top = self.reference.block(index)
        for start in range(0, codes.shape[0], CHUNK):
            part = slice(start, min(start + CHUNK, codes.shape[0]))
            rows = logits[start:part.stop + 1]  # block_kld drops the last row it is given
            kld, same = block_kld(codes[part], offset[part], neg_entropy[part], top[part], rows,
                                  None if lse is None else lse[part])
            self.klds.append(kld)
            self.same.append(same)

    def summary(self) -> Optional[dict[str, Any]]:
        """``{kld_mean, kld_p99, same_top_pct, kld_tokens}``; None when nothing was scored."""
        if not self.klds:
            return None
        kld, same = np.concatenate(self.klds), np.concatenate(self.same)
        return {"kld_mean": round(float(kld.mean()), 6), "kld_p99": round(float(np.percentile(kld, P99)), 6),
                "same_top_pct": round(100.0 * float(same.mean()), 3), "kld_tokens": int(kld.size)}


def kld_text(entry: dict[str, Any]) -> str:
    """``KLD 0.0123 (99th pct 0.0871), same top token 95.1 %`` for a log line; '' when not measured."""
    if entry.get("kld_mean") is None:
        return ""
    return (f"KLD {entry['kld_mean']:.4f} (99th pct {entry['kld_p99']:.4f}), "
            f"same top token {entry['same_top_pct']:.1f} %")
