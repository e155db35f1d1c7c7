"""KL divergence from stored reference logits: the 16-bit storage against exact float64 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from rawtune.export import kld


def exact(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row in float64."""
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _logits(rng: np.random.Generator, blocks: int, seq: int, vocab: int, spread: float) -> np.ndarray:
    # Peaked rows (a few likely tokens over a long tail), like a language model's.
    return (rng.normal(size=(blocks, seq, vocab)) * spread).astype(np.float32)


def test_stored_reference_gives_the_exact_divergence(tmp_path):
    rng = np.random.default_rng(0)
    ref = _logits(rng, 3, 33, 500, 3.0)
    noise = [0.02, 0.3, 2.0]  # near-lossless, 4-bit-like, broken
    store = kld.ReferenceStore(tmp_path / "ref.npy", 3, 33, 500)
    store.add(0, ref[:2])
    store.add(2, ref[2:])
    for scale in noise:
        q = ref + rng.normal(size=ref.shape).astype(np.float32) * scale
        scorer = kld.Scorer(store)
        for i in range(3):
            scorer.add(i, q[i])
        want = np.concatenate([exact(ref[i, :-1], q[i, :-1]) for i in range(3)])
        got = scorer.summary()
        assert got["kld_tokens"] == 3 * 32
        # 16-bit codes: an absolute error of a few 1e-5 per token at most, so the means agree
        # to a small fraction of even the near-lossless file's divergence.
        assert abs(got["kld_mean"] - want.mean()) < 2e-5 + 1e-3 * want.mean(), (scale, got, want.mean())
        assert abs(got["kld_p99"] - np.percentile(want, 99)) < 5e-5 + 2e-3 * np.percentile(want, 99)
        same = np.mean(ref[:, :-1].argmax(-1) == q[:, :-1].argmax(-1)) * 100
        assert got["same_top_pct"] == round(same, 3)
    store.close()
    assert not (tmp_path / "ref.npy").exists()


def test_the_perplexity_pass_log_sum_exp_gives_the_same_divergences(tmp_path):
    """llama_perplexity hands the scorer each row's log-sum-exp from its NLL pass; the divergences
    match those the scorer computes on its own, and the exact ones, and a wrong lse would show."""
    from rawtune.export.steps import _nll_from_logits

    rng = np.random.default_rng(3)
    ref = _logits(rng, 2, 300, 700, 3.0)  # 299 scored rows: three scorer chunks of up to 128
    store = kld.ReferenceStore(tmp_path / "ref.npy", 2, 300, 700)
    store.add(0, ref)
    q = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.3
    tokens = rng.integers(0, 700, size=(2, 300))
    own, shared, shifted = kld.Scorer(store), kld.Scorer(store), kld.Scorer(store)
    for i in range(2):
        nll, n, lse = _nll_from_logits(q[i], tokens[i])
        assert n == 299 and lse.shape == (299,)
        own.add(i, q[i])
        shared.add(i, q[i], lse)
        shifted.add(i, q[i], lse + 0.01)  # a negative control: an lse off by 0.01 nats moves the mean by 0.01
    want = np.concatenate([exact(ref[i, :-1], q[i, :-1]) for i in range(2)])
    a, b = np.concatenate(own.klds), np.concatenate(shared.klds)
    assert np.allclose(a, b, rtol=0, atol=1e-5) and abs(b.mean() - want.mean()) < 2e-5 + 1e-3 * want.mean()
    assert abs(np.concatenate(shifted.klds).mean() - b.mean() - 0.01) < 1e-4
    store.close()


def test_identical_logits_score_zero_and_the_same_top_token(tmp_path):
    rng = np.random.default_rng(1)
    ref = _logits(rng, 1, 17, 300, 5.0)
    store = kld.ReferenceStore(tmp_path / "ref.npy", 1, 17, 300)
    store.add(0, ref)
    scorer = kld.Scorer(store)
    scorer.add(0, ref[0])
    got = scorer.summary()
    assert got["kld_mean"] < 1e-6 and got["same_top_pct"] == 100.0


def test_a_padded_vocabulary_is_compared_on_the_shared_columns(tmp_path):
    """The reference has 8 padding columns the file lacks (or the other way round): both are
    renormalised over the shared ones."""
    rng = np.random.default_rng(2)
    shared = _logits(rng, 1, 9, 200, 2.0)[0]
    padded = np.concatenate([shared, np.full((9, 8), -30.0, dtype=np.float32)], axis=1)
    q = shared + rng.normal(size=shared.shape).astype(np.float32) * 0.5
    want = exact(shared[:-1], q[:-1]).mean()
    for ref_side, file_side in ((padded, q), (shared, np.concatenate([q, padded[:, 200:]], axis=1))):
        store = kld.ReferenceStore(tmp_path / "ref.npy", 1, 9, ref_side.shape[1])
        store.add(0, ref_side[None])
        scorer = kld.Scorer(store)
        scorer.add(0, file_side)
        assert abs(scorer.summary()["kld_mean"] - want) < 1e-4 + 1e-3 * want
        store.close()


def test_log_text():
    assert kld.kld_text({}) == ""
    line = kld.kld_text({"kld_mean": 0.01234, "kld_p99": 0.2, "same_top_pct": 93.25})
    assert line == "KLD 0.0123 (99th pct 0.2000), same top token 93.2 %"


def test_app_export_table_shows_kld(tmp_path):
    from rawtune.rundir import RunDir
    from rawtune.ui.handlers import _gguf_table

    run = RunDir(tmp_path / "run")
    run.update(export={"ppl_merged": 15.0}, gguf={
        "Q4_K_M": {"file": "r.Q4_K_M.gguf", "bytes": 2_000_000, "ppl": 15.5, "ppl_increase_pct": 3.333,
                   "kld_mean": 0.0312, "kld_p99": 0.2871, "same_top_pct": 91.3},
        "Q8_0": {"file": "r.Q8_0.gguf", "bytes": 4_000_000, "ppl": 15.02}})
    rows = _gguf_table(run)
    assert rows[1] == ["Q4_K_M", "r.Q4_K_M.gguf", 2.0, 15.5, "+3.33 %", 0.0312, 0.2871, 91.3]
    assert rows[2][5:] == [None, None, None]  # not measured: empty cells, not zeros


def test_chunks_give_the_same_numbers(tmp_path, monkeypatch):
    """Positions are stored and scored CHUNK at a time (memory); the split changes nothing."""
    rng = np.random.default_rng(3)
    ref = _logits(rng, 2, 40, 300, 3.0)
    q = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.3

    def summary(chunk: int) -> dict:
        monkeypatch.setattr(kld, "CHUNK", chunk)
        store = kld.ReferenceStore(tmp_path / f"ref{chunk}.npy", 2, 40, 300)
        store.add(0, ref)
        scorer = kld.Scorer(store)
        for i in range(2):
            scorer.add(i, q[i])
        return scorer.summary()

    whole, split = summary(128), summary(7)
    assert whole["kld_tokens"] == split["kld_tokens"] == 2 * 39
    for key in ("kld_mean", "kld_p99", "same_top_pct"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
