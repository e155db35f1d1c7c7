"""``python -m rawtune.families``: list the registry, or rewrite (``--readme``) / check (``--check``) the README tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import all_families
from .readme import rewrite

README = Path(__file__).resolve().parents[2] / "README.md"


def main(argv: list[str] | None = None) -> int:
    """List the families; with --readme rewrite the README's tables, with --check exit 1 when they differ."""
    parser = argparse.ArgumentParser(prog="python -m rawtune.families", description=main.__doc__)
    parser.add_argument("--readme", action="store_true", help="rewrite the family and model tables in README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's tables differ")
    parser.add_argument("--path", type=Path, default=README, help="the README to rewrite or check")
    args = parser.parse_args(argv)
    if args.readme or args.check:
        text = args.path.read_text(encoding="utf-8")
        new = rewrite(text)
        if args.check:
            if new != text:
                print(f"{args.path}: the family/model tables differ from the registry; "
                      "run python -m rawtune.families --readme", file=sys.stderr)
                return 1
            return 0
        args.path.write_text(new, encoding="utf-8")
        return 0
    for f in all_families():
        print(f"{f.name:10s} {', '.join(f.hf_architectures):28s} {f.gguf.name if f.gguf else '-':10s} {f.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
