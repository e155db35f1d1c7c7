"""The data stage: every local format, column choice, cleaning, packing and the held-out split."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rawtune.data import clean, pack, prepare, read_documents, split_documents
from rawtune.errors import DataError
from rawtune.rundir import RunDir
from rawtune.settings import DataSettings

DOCS = ["First document about rivers and mills.", "Second document about lighthouses.",
        "Third document, with a comma, about gulls."]


def read(path, **kw) -> list[str]:
    return read_documents(DataSettings(dataset=str(path), **kw)).texts


def test_jsonl_seed_shape(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d, "metadata": {"i": i}}) for i, d in enumerate(DOCS)) + "\n\n")
    docs = read_documents(DataSettings(dataset=str(p)))
    assert docs.texts == DOCS and docs.column == "text" and "metadata" in docs.columns


def test_json_array(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"body": d} for d in DOCS]))
    assert read(p) == DOCS


def test_csv_and_tsv_pick_longest_string_column(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,title,content\n" + "".join(f'{i},t{i},"{d}"\n' for i, d in enumerate(DOCS)))
    docs = read_documents(DataSettings(dataset=str(p)))
    assert docs.column == "content" and "most characters" in docs.column_reason
    assert docs.texts == DOCS
    t = tmp_path / "c.tsv"
    t.write_text("title\tcontent\n" + "".join(f"t\t{d}\n" for d in DOCS))
    assert read(t) == DOCS


def test_parquet_with_explicit_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["x"] * 3, "body": DOCS}), p)
    assert read(p, text_column="body") == DOCS


def test_txt_and_markdown(tmp_path):
    (tmp_path / "a.txt").write_text("one whole file\n\nstill the same document")
    (tmp_path / "b.md").write_text("# Title\n\npara two\n\n\npara three")
    assert read(tmp_path / "a.txt") == ["one whole file\n\nstill the same document"]
    assert read(tmp_path / "b.md", split_blank_lines=True) == ["# Title", "para two", "para three"]
    # A folder reads every supported file in name order.
    assert len(read(tmp_path)) == 2


def test_unknown_column_lists_columns(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "x", "meta": 1}) + "\n")
    with pytest.raises(DataError, match=r"--text-column 'text2' not found; columns are: body, meta"):
        read(p, text_column="text2")


@pytest.mark.parametrize("name,content,message", [
    ("c.docx", b"PK..", "unsupported file type '.docx'"),
    ("c.txt", "caf\u00e9".encode("latin-1"), "not UTF-8 text"),
    ("c.jsonl", b'{"text": "ok"}\n{broken\n', "line 2: invalid JSON"),
])
def test_bad_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read(p)


def test_missing_source_and_no_text_column(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read(tmp_path / "nope.jsonl")
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"a": 1, "b": 2}) + "\n")
    with pytest.raises(DataError, match="no text column found; columns are: a, b"):
        read(p)


def test_clean_counts():
    kept, counts = clean(["  a long enough text  ", "", "   ", "short", "a long enough text", "another long text"],
                         min_chars=10, dedupe=True)
    assert kept == ["a long enough text", "another long text"]
    assert counts == {"documents_read": 6, "dropped_empty": 2, "dropped_short": 1, "dropped_duplicate": 1}


def test_pack_and_split_are_disjoint():
    docs = [[i] * (i % 7 + 3) for i in range(100)]
    train, held = split_documents(docs, fraction=0.1, min_tokens=20, seed=1)
    assert len(train) + len(held) == len(docs)
    assert not {d[0] for d in train} & {d[0] for d in held}
    assert sum(map(len, held)) >= max(20, int(0.1 * sum(map(len, docs))))
    blocks, left = pack(train, 8)
    assert blocks.shape[1] == 8 and blocks.size + left == sum(map(len, train))


def _random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
    return [" ".join(word() for _ in range(40)) for _ in range(n)]


def _ngrams(blocks: np.ndarray, n: int) -> set:
    flat = blocks.reshape(-1)
    return {tuple(flat[i:i + n]) for i in range(len(flat) - n + 1)}


def test_prepare_heldout_never_trained_on(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    p = tmp_path / "c.jsonl"
    docs = _random_docs(150)
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:5] + ["tiny"]))
    run = RunDir(tmp_path / "run")
    report = prepare(DataSettings(dataset=str(p)), tok, seq_len=32, run=run, log=lambda s: None)
    assert report.dropped_duplicate == 5 and report.dropped_short == 1 and report.documents_kept == 150
    train, held = np.load(run.data_dir / "train.npy"), np.load(run.data_dir / "heldout.npy")
    assert train.shape[1] == held.shape[1] == 32 and len(held) >= 4
    assert report.train_blocks == len(train) and report.heldout_blocks == len(held)
    # Every document ends with EOS (but the head of a document whose tail is held out, and the packing leftover).
    assert report.documents_cut <= 1
    assert (train == tok.eos_token_id).sum() >= report.train_documents - 1 - report.documents_cut
    # No 12-token window of held-out text appears in the training blocks.
    assert not _ngrams(held, 12) & _ngrams(train, 12)
    assert run.load()["data"]["heldout_blocks"] == len(held)


def test_prepare_errors(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(DataError, match="nothing left after cleaning"):
        prepare(DataSettings(dataset=str(p)), tok, 32, RunDir(tmp_path / "r"), log=lambda s: None)
    p.write_text(json.dumps({"text": "a sentence that is long enough"}) + "\n")
    with pytest.raises(DataError, match="corpus too small"):
        prepare(DataSettings(dataset=str(p)), tok, 32, RunDir(tmp_path / "r"), log=lambda s: None)
