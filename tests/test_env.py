"""Environment variables are declared once (rawtune/env.py): every ``RAWTUNE_*`` name the code or
the docs use is declared, modules read them only through ``env.get``/``env.flag``, and
docs/environment.md is the table generated from the declarations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rawtune import env

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"RAWTUNE_[A-Z0-9_]+")


def code_files(root: Path) -> list[Path]:
    return sorted((root / "rawtune").rglob("*.py")) + [root / "app.py"]


def raw_reads(path: Path) -> list[str]:
    """``RAWTUNE_*`` names read past rawtune.env: os.environ.get/[...]/getenv with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        target = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            if func in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                target = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and ast.unparse(node.value) in ("os.environ", "environ") and isinstance(node.slice, ast.Constant):
            target = node.slice.value
        if isinstance(target, str) and target.startswith("RAWTUNE_"):
            found.append(f"{path.name}:{node.lineno} {target}")
    return found


def test_docs_table_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "environment.md").read_text(encoding="utf-8") == env.markdown(), \
        "docs/environment.md is stale: run `python -m rawtune.env --write`"


def test_every_name_in_code_and_docs_is_declared():
    texts = [p.read_text(encoding="utf-8") for p in code_files(ROOT)]
    texts += [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    used = set().union(*(NAME.findall(t) for t in texts))
    assert used - set(env.BY_NAME) == set()
    # And nothing is declared that nothing reads.
    code = "\n".join(p.read_text(encoding="utf-8") for p in code_files(ROOT) if p.name != "env.py")
    assert {n for n in env.BY_NAME if n not in code} <= {"RAWTUNE_ARTIFACTS"}


def test_modules_read_variables_only_through_env():
    reads = [r for p in code_files(ROOT) if p.name != "env.py" for r in raw_reads(p)]
    assert reads == []


def test_the_read_check_finds_a_planted_read(tmp_path):
    """Negative control: the same check on a copy with one direct read added reports it."""
    planted = tmp_path / "planted.py"
    planted.write_text('import os\nx = os.environ.get("RAWTUNE_RUNS", "runs")\ny = os.environ["RAWTUNE_GPUS"]\n'
                       'z = os.getenv("RAWTUNE_CACHE")\nos.environ["RAWTUNE_SHARED"] = "1"\n')
    assert raw_reads(planted) == ["planted.py:2 RAWTUNE_RUNS", "planted.py:3 RAWTUNE_GPUS",
                                  "planted.py:4 RAWTUNE_CACHE"]


def test_get_falls_back_to_the_declared_default(monkeypatch):
    monkeypatch.delenv("RAWTUNE_RUN_TTL_HOURS", raising=False)
    assert env.get("RAWTUNE_RUN_TTL_HOURS") == "24"
    monkeypatch.setenv("RAWTUNE_RUN_TTL_HOURS", " 2 ")
    assert env.get("RAWTUNE_RUN_TTL_HOURS") == "2"
    with pytest.raises(KeyError, match="RAWTUNE_NOT_A_THING is not declared"):
        env.get("RAWTUNE_NOT_A_THING")
