"""The architecture contract: layers point only downward, no import cycle, no borrowed private names.

The layers are import-linter's contracts in pyproject.toml (run here with the real ``lint-imports``
against this checkout). The import graph below is read from the source with ``ast`` (every
import, also those inside functions), to check what import-linter does not: no cycle anywhere,
and no module importing another module's ``_private`` name.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rawtune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path]) -> dict[str, list[tuple[str, str, int]]]:
    """module -> [(imported module, imported name or '', line)] for imports inside rawtune."""
    graph: dict[str, list[tuple[str, str, int]]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "rawtune"]
            elif isinstance(node, ast.ImportFrom):
                target = resolve(name, is_package, node)
                if target.split(".")[0] != "rawtune":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    # `from . import steps` imports a module; `from .steps import plan` a name.
                    edges.append((sub, "", node.lineno) if sub in known else (target, alias.name, node.lineno))
    return graph


def cycles(graph: dict[str, list[tuple[str, str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    succ = {m: sorted({t for t, _, _ in edges if t in graph}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                found.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found


def private_imports(graph: dict[str, list[tuple[str, str, int]]]) -> list[str]:
    return [f"{m}:{line} imports {name} from {target}" for m, edges in graph.items()
            for target, name, line in edges
            if name.startswith("_") and not name.startswith("__") and target != m]


def test_no_import_cycle_and_no_private_import():
    known = modules()
    graph = imports(known)
    assert {"rawtune.train.progress", "rawtune.export.llama", "rawtune.hubauth"} <= set(graph)
    assert cycles(graph) == []
    assert private_imports(graph) == []


def test_the_checks_catch_a_cycle_and_a_private_import():
    """Negative control: the same checks on a graph with the faults put in."""
    graph = imports(modules())
    graph["rawtune.errors"].append(("rawtune.pipeline", "", 1))  # pipeline -> ... -> errors -> pipeline
    graph["rawtune.compare"].append(("rawtune.export.steps", "_warn", 1))
    assert any("rawtune.errors" in c and "rawtune.pipeline" in c for c in cycles(graph))
    assert private_imports(graph) == ["rawtune.compare:1 imports _warn from rawtune.export.steps"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'rawtune[test]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_layers_contract_breaks_on_an_upward_import(tmp_path):
    """Negative control: a copy of the package where a low layer imports the pipeline fails."""
    shutil.copytree(PACKAGE, tmp_path / "rawtune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    models = tmp_path / "rawtune" / "models.py"
    models.write_text(models.read_text(encoding="utf-8") + "\n\ndef _upward():\n    from .pipeline import run_pipeline\n"
                      "    return run_pipeline\n", encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "rawtune.models -> rawtune.pipeline" in result.stdout, result.stdout[-3000:]


# ---------------------------------------------------------------- family facts live in rawtune/families/

# Any transformers model class of a causal LM, but the Auto class every module may load through.
HF_ARCH = re.compile(r"\b(?!AutoModel)[A-Z]\w*ForCausalLM\b")
# String literals (file, value) holding a registry fact that are something else where they stand, with why.
NOT_FAMILY_FACTS = {
    ("rawtune/export/gguf_writer.py", "llama"),  # GGUF's tokenizer.ggml.model name for SentencePiece vocabularies
    ("rawtune/settings.py", "HuggingFaceTB/SmolLM2-135M"),  # the default model setting (a product choice)
    ("rawtune/models.py", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the upstream of the offline GGUF package
}


def registry_facts() -> set[str]:
    """Strings that state a family fact: HF architectures, model types, llama.cpp architectures,
    known Hub ids, end-of-turn tokens and pre-tokenizer names, as the registry declares them."""
    from rawtune import families

    facts: set[str] = set(families.pre_tokenizers().values()) | set(families.merges_applied().values())
    for fam in families.all_families():
        facts |= set(fam.hf_architectures) | set(fam.model_types) | set(fam.template.end_of_turn)
        facts |= {m.repo for m in fam.models} | ({fam.gguf.name} if fam.gguf else set())
    return facts


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (prose may name families; code may not)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_facts_outside(root: Path, facts: set[str]) -> list[str]:
    """Where a module outside rawtune/families/ states a family fact: an HF architecture class name
    anywhere in its text, or a string literal in its code that is (or, for Hub ids and special
    tokens, contains) one of the registry's facts."""
    found = []
    for path in sorted((root / "rawtune").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("rawtune/families/"):
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{rel}:{i}: {m.group(0)}" for i, line in enumerate(text.splitlines(), 1)
                  for m in HF_ARCH.finditer(line)]
        tree = ast.parse(text)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
                continue
            for fact in facts:
                inside = ("/" in fact or fact.startswith("<")) and fact in node.value
                if (node.value == fact or inside) and (rel, node.value) not in NOT_FAMILY_FACTS:
                    found.append(f"{rel}:{node.lineno}: {fact!r}")
    return found


def test_family_facts_live_in_the_registry():
    facts = registry_facts()
    assert {"LlamaForCausalLM", "qwen2", "<|eot_id|>", "Qwen/Qwen3-0.6B", "olmo2", "dbrx"} <= facts
    assert family_facts_outside(ROOT, facts) == []


def test_family_fact_check_finds_a_planted_fact(tmp_path):
    """Negative control: a copy of the package with an architecture name, a model type and an
    end-of-turn token put back into modules outside the registry."""
    shutil.copytree(PACKAGE, tmp_path / "rawtune", ignore=shutil.ignore_patterns("__pycache__"))
    compare = tmp_path / "rawtune" / "compare.py"
    compare.write_text(compare.read_text(encoding="utf-8") + '\nSTOPS = ("<|im_end|>",)\n', encoding="utf-8")
    fast = tmp_path / "rawtune" / "train" / "fast_loop.py"
    fast.write_text(fast.read_text(encoding="utf-8") + '\n# Gemma2ForCausalLM is slow\nKNOWS = ("mistral",)\n',
                    encoding="utf-8")
    found = family_facts_outside(tmp_path, registry_facts())
    assert any(f.startswith("rawtune/compare.py:") and "<|im_end|>" in f for f in found), found
    assert any(f.startswith("rawtune/train/fast_loop.py:") and "Gemma2ForCausalLM" in f for f in found), found
    assert any(f.startswith("rawtune/train/fast_loop.py:") and "'mistral'" in f for f in found), found
    assert len(found) == 3, found


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
