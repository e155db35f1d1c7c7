"""Build the benches' unseen corpus: Debian package changelogs of the machine it runs on.

The text is the ``changelog.Debian.gz`` files under /usr/share/doc (sorted by package name, the
first ``--files`` of them, up to ``--max-chars`` characters each), written in rawtune's seed JSONL
shape. SmolLM2 has seen little of this kind of text, so a matrix or a tuning fitted to the Python
documentation has to generalise to it. The exact files differ between machines; the benches print
the corpus size they used.

Run: python bench/changelog_corpus.py OUT.jsonl [--files 114] [--max-chars 6000]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=114, help="how many packages' changelogs")
    parser.add_argument("--max-chars", type=int, default=6000, help="characters kept from each")
    args = parser.parse_args(argv)
    found = sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))[:args.files]
    if not found:
        print("no changelog.Debian.gz under /usr/share/doc on this machine")
        return 1
    with args.out.open("w") as out:
        for path in found:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")[:args.max_chars]
            out.write(json.dumps({"text": text, "metadata": {"package": path.parent.name}}) + "\n")
    size = args.out.stat().st_size
    print(f"{len(found)} changelogs, {size / 1e3:.0f} kB -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
