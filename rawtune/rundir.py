"""The run directory: how stages hand off to each other.

A run directory holds ``run.json`` (resolved settings, versions, data report, metrics and each
stage's results) next to the files stages write: ``data/`` (packed token blocks), ``adapter/``,
``checkpoints/``, ``merged/``, ``gguf/``. ``run.json`` is rewritten atomically so a crash never
leaves it half-written, and never holds a token.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import StageMissing

RUN_FILE = "run.json"
# Every kind of Hugging Face token: user access tokens (hf_...), OAuth access tokens handed out
# by a Space login (hf_oauth_..., with underscores inside), and legacy organisation tokens
# (api_org_...). An Authorization header value is masked whatever the token looks like.
TOKEN_RE = re.compile(r"(?:hf_(?:oauth_)?|api_org_)[A-Za-z0-9_-]{8,}|(?i:\bbearer\s+)[^\s'\",]+")
_SECRET_KEYS = {"token", "hf_token", "oauth_token", "password", "authorization"}


def scrub(value: Any) -> Any:
    """Return ``value`` with secret-looking keys dropped and token-like strings masked."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in _SECRET_KEYS}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return TOKEN_RE.sub(_mask, value)
    return value


def _mask(match: "re.Match[str]") -> str:
    text = match.group(0)
    return text.split()[0] + " ***" if text[:6].lower() == "bearer" else "hf_***"


class RunDir:
    """A run directory and its ``run.json``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # Well-known locations, so stages agree on where things live.
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.path / "gguf"

    @property
    def stop_file(self) -> Path:
        """Creating this file asks a running training to stop after the current step."""
        return self.path / "STOP"

    def exists(self) -> bool:
        return self.run_file.is_file()

    def has_adapter(self) -> bool:
        """Whether training (finished or stopped) has left a LoRA adapter to use."""
        return (self.adapter_dir / "adapter_config.json").is_file()

    def load(self) -> dict[str, Any]:
        """Read run.json (an empty dict when the run has not started)."""
        if not self.run_file.is_file():
            return {}
        return json.loads(self.run_file.read_text(encoding="utf-8"))

    def require(self, key: str, stage: str) -> Any:
        """Return ``run.json[key]`` or explain which stage must run first."""
        record = self.load()
        if key not in record:
            raise StageMissing(
                f"{self.path} has no '{key}' yet: run `rawtune {stage} ...` on it first"
            )
        return record[key]

    def update(self, **sections: Any) -> dict[str, Any]:
        """Merge top-level sections into run.json and write it atomically."""
        record = self.load()
        record.update(scrub(sections))
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".run.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
        os.replace(tmp, self.run_file)
        return record
