"""Rebuild examples/python-docs.jsonl from the Python documentation that ships with CPython.

The text is the language reference topics in the standard library's ``pydoc_data.topics``
(Python documentation, PSF License Version 2). Each topic is cut at blank lines into documents of
at least ~800 characters, written in rawtune's seed JSONL shape: {"text": ..., "metadata": {...}}.
Run: python examples/make_corpus.py
"""

import json
import re
from pathlib import Path

from pydoc_data.topics import topics

MIN_CHARS = 800


def documents(text: str):
    """Group consecutive paragraphs of one topic into documents of at least MIN_CHARS."""
    buffer: list[str] = []
    part = 0
    for para in re.split(r"\n\s*\n", text.strip()):
        buffer.append(para.rstrip())
        if sum(map(len, buffer)) >= MIN_CHARS:
            yield part, "\n\n".join(buffer)
            buffer, part = [], part + 1
    if buffer:
        yield part, "\n\n".join(buffer)


def main() -> None:
    out = Path(__file__).with_name("python-docs.jsonl")
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for name in sorted(topics):
            for part, text in documents(topics[name]):
                meta = {"topic": name, "part": part, "source": "Python documentation (pydoc_data.topics)",
                        "license": "PSF-2.0"}
                handle.write(json.dumps({"text": text, "metadata": meta}, ensure_ascii=False) + "\n")
                count += 1
    print(out, count, "documents")


if __name__ == "__main__":
    main()
