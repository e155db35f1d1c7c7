"""Streamed merge: the base model's weights plus the LoRA adapter, one tensor at a time.

Merging by loading the whole base in fp32 needs four bytes of RAM per parameter (16 GB for a 4B
model), which most Space hardware does not have. This module reads the base's safetensors files
tensor by tensor, folds the adapter into each weight and hands the result on, so peak memory is a
few tensors whatever the model's size:

- :func:`iter_merged_tensors` yields ``(hf_name, tensor)`` for a GGUF writer (or anything else);
  :func:`iter_merged_arrays` yields float32 numpy arrays, a drop-in for the writer's folder reader;
- :func:`write_merged_folder` writes a plain HF folder (config with the tie flag fixed, tokenizer,
  safetensors shards written tensor by tensor) for ``rawtune merge`` and for pushing merged weights;
- :func:`write_skeleton` writes only the config and tokenizer: what a GGUF writer reads besides
  the tensors; :func:`for_gguf` returns that folder together with the tensor iterator, and
  :func:`merged_shapes` the names and shapes from the file headers alone (a GGUF's tensor infos);
- :func:`fill_merged` puts the merged weights into a base model loaded in PyTorch (export's
  reference model for the importance matrix and the perplexity check), without a merged folder.

The maths is PEFT's ``merge_and_unload`` on an fp32 model: ``W + (B @ A) * scale`` in fp32 with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), trained ``modules_to_save`` copies
(embed_tokens, lm_head) replacing the base tensors, and a base with tied embeddings saved untied
when either embedding was trained (the rule of :func:`rawtune.merge.untie_if_needed`). Results are
cast to ``dtype`` last, so in fp32 every tensor is bit-identical to that merge (tested).

A 4-bit-trained (QLoRA) adapter is saved in the same format (PEFT stores A and B in 16 or 32 bits,
never quantized), so it merges onto the 16-bit base model in the same way.

Tensors are read with plain file reads rather than a memory map: the pages of a mapped file count
in the process's resident memory until it is unmapped, so mapping a 2.4 GB base would show 2.4 GB.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .errors import ExportError
from .models import ADAPTER_WEIGHTS, check_adapter
from .rundir import RunDir

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SHARD_BYTES = 4 * 2**30  # well under the Hub's 50 GB per-file limit; few files for an 8B model


# ---------------------------------------------------------------- reading safetensors


class TensorFile:
    """One safetensors file: its header, and single tensors read on demand (no memory map)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries: dict[str, dict] = header

    def names(self) -> list[str]:
        """Tensor names in file order (by offset)."""
        return sorted(self.entries, key=lambda n: self.entries[n]["data_offsets"][0])

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> Any:
        import torch

        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with self.path.open("rb") as handle:
            handle.seek(self.start + begin)
            handle.readinto(buffer)
        dtype = getattr(torch, _DTYPES[entry["dtype"]])
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def base_files(base_dir: Path) -> list[Path]:
    """The base model's safetensors files (one file or the shards its index names)."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [base_dir / n for n in sorted(set(names))]
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    raise ExportError(f"{base_dir} has no model.safetensors (or index): the streamed merge reads safetensors; "
                      f"re-save the base with save_pretrained(safe_serialization=True)")


def has_safetensors(base_dir: Path) -> bool:
    base_dir = Path(base_dir)
    return (base_dir / "model.safetensors").is_file() or (base_dir / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """A saved PEFT LoRA adapter: its scale, and where each A/B pair and replacement lives."""

    scale: float
    file: TensorFile
    lora: dict[str, tuple[str, str]]  # base weight name -> (A key, B key)
    replaced: dict[str, str]  # base weight name -> modules_to_save key


def _base_name(key: str, parameters: tuple[str, ...] = ()) -> tuple[str, str]:
    """Split an adapter key into (base weight name, kind): kind is 'A', 'B' or 'full'.

    ``parameters``: the adapter's ``target_parameters``. PEFT wraps a module once per adapted
    parameter, nesting the wrappers in the order of that list (the first innermost), so the key of
    the n-th wrapper from the outside has n ``base_layer`` steps: ``experts.lora_A`` adapts the last
    listed parameter of ``experts``, ``experts.base_layer.lora_A`` the one before.
    """
    key = re.sub(r"^base_model\.model\.", "", key)
    match = re.fullmatch(r"(.+?)((?:\.base_layer)*)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if match:
        module, depth, kind = match.group(1), match.group(2).count(".base_layer"), match.group(3)
        owned = [p.rsplit(".", 1)[1] for p in parameters if f".{module}".endswith("." + p.rsplit(".", 1)[0])]
        if owned:
            if depth >= len(owned):
                raise ExportError(f"adapter key {key} is nested deeper than the {len(owned)} parameters it targets")
            return f"{module}.{owned[len(owned) - 1 - depth]}", kind
        return module + ".weight", kind
    key = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", key)
    return key, "full"


def _check_config(config: dict, adapter_dir: Path) -> None:
    """Refuse adapter features whose merge is not the plain ``W + scale * B @ A``."""
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type {config.get('peft_type')}")
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias {config.get('bias')!r}")
    if unsupported:
        raise ExportError(f"{adapter_dir}: the streamed merge supports plain LoRA adapters, not "
                          f"{', '.join(unsupported)}; retrain with rawtune's defaults")


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter's scale and the index of its tensors (tensors themselves are read when used)."""
    adapter_dir = Path(adapter_dir)
    config = check_adapter(adapter_dir)  # both files whole, or one line saying which is damaged
    weights = adapter_dir / ADAPTER_WEIGHTS
    _check_config(config, adapter_dir)
    r, alpha = config["r"], config["lora_alpha"]
    # The same expression PEFT uses, so the float is the same to the last bit.
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    file = TensorFile(weights)
    pairs: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    parameters = tuple(config.get("target_parameters") or ())
    for key in file.names():
        name, kind = _base_name(key, parameters)
        if kind == "full":
            replaced[name] = key
        else:
            pairs.setdefault(name, {})[kind] = key
    broken = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if broken:
        raise ExportError(f"{weights} has LoRA A without B (or B without A) for {broken[0]}: the adapter is incomplete")
    lora = {n: (p["A"], p["B"]) for n, p in pairs.items()}
    return Adapter(scale=scale, file=file, lora=lora, replaced=replaced)


# ---------------------------------------------------------------- the merged tensors


def _config(base_dir: Path) -> dict:
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{base_dir} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _tied(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


@dataclass
class Plan:
    """What the merged model holds: names and shapes in yield order, and the tie decision."""

    names: list[tuple[str, tuple, Optional[TensorFile]]]  # (name, shape, file it comes from)
    untied: bool  # a tied base saved untied (an embedding was trained)
    tied_after: bool  # the merged model's tie_word_embeddings


def merge_plan(base_dir: Path, adapter: Adapter) -> Plan:
    """Which tensors the merged model has, from the file headers alone (no tensor is read)."""
    tied = _tied(_config(base_dir))
    files = [TensorFile(p) for p in base_files(base_dir)]
    untie = tied and (EMBED in adapter.replaced or HEAD in adapter.replaced)
    names: list[tuple[str, tuple, Optional[TensorFile]]] = []
    embed_shape = None
    for f in files:
        for name in f.names():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer transformers recomputes; a saved model does not hold it
            if name == EMBED:
                embed_shape = f.shape(name)
            if name == HEAD and tied:
                continue  # tied: the head is the embedding (added back below when untied)
            names.append((name, f.shape(name), f))
    if untie:
        if embed_shape is None:
            raise ExportError(f"{base_dir}: tied embeddings but no {EMBED} in the safetensors files")
        names.append((HEAD, embed_shape, None))
    # Sorted by name, the order safetensors lists a saved model's tensors in: a GGUF written from
    # this stream is then the same file, byte for byte, as one written from a saved merged folder.
    names.sort(key=lambda item: item[0])
    missing = set(adapter.lora) - {n for n, _, _ in names}
    if missing:
        raise ExportError(f"the adapter adapts {sorted(missing)[0]}, which the base model in {base_dir} does not have: "
                          "was it trained on another model?")
    return Plan(names=names, untied=untie, tied_after=tied and not untie)


def _merged(name: str, source: Optional[TensorFile], adapter: Adapter, embed_file: Optional[TensorFile]) -> Any:
    """One merged tensor in fp32, as PEFT's merge computes it on an fp32 model."""
    import torch

    if name in adapter.replaced:
        return adapter.file.read(adapter.replaced[name]).to(torch.float32)
    if source is None:  # the untied head of a tied base whose head was not trained: the base embedding
        return embed_file.read(EMBED).to(torch.float32)
    weight = source.read(name)
    if name not in adapter.lora or not weight.is_floating_point():
        return weight.to(torch.float32) if weight.is_floating_point() else weight
    weight = weight.to(torch.float32)
    a_key, b_key = adapter.lora[name]
    lora_a = adapter.file.read(a_key).to(torch.float32)
    lora_b = adapter.file.read(b_key).to(torch.float32)
    weight += (_expert_delta(name, weight.shape, lora_a, lora_b) if weight.ndim == 3 else lora_b @ lora_a) * adapter.scale
    return weight


def _expert_delta(name: str, shape: tuple, lora_a: Any, lora_b: Any) -> Any:
    """B @ A for stacked experts (a 3-D parameter adapted through PEFT's ``target_parameters``).

    PEFT keeps one A of ``[rank * experts, in]`` (rows expert-major) and one B of ``[out, rank *
    experts]`` (columns rank-major) and forms each expert's ``A_e^T B_e^T`` in the parameter's own
    ``[experts, in, out]`` layout (gpt-oss: ``x @ W_e``); a parameter stored ``[experts, out, in]``
    gets the transpose. A square parameter is taken as ``[experts, in, out]``, the layout of the
    families that declare expert targets.
    """
    import torch

    experts, rows, cols = shape
    rank = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, rank, lora_a.shape[1])
    b = lora_b.reshape(lora_b.shape[0], rank, experts)
    if (a.shape[2], b.shape[0]) == (rows, cols):
        return torch.einsum("ore,eri->eio", b, a)
    if (a.shape[2], b.shape[0]) == (cols, rows):
        return torch.einsum("ore,eri->eoi", b, a)
    raise ExportError(f"the adapter's LoRA for {name} ({tuple(lora_a.shape)}, {tuple(lora_b.shape)}) does not fit "
                      f"its {tuple(shape)} experts: was it trained on another model?")


def iter_merged_tensors(base_dir: str | Path, adapter_dir: str | Path, dtype: Any = None,
                        plan: Optional[Plan] = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, tensor)`` of the merged model, one tensor in memory at a time.

    ``dtype``: the torch dtype of the yielded floating tensors (default float32: bit-identical to
    PEFT's fp32 merge; bfloat16/float16 are that result rounded once).
    """
    import torch

    dtype = dtype or torch.float32
    adapter = read_adapter(Path(adapter_dir))
    plan = plan or merge_plan(Path(base_dir), adapter)
    embed_file = next((f for n, _, f in plan.names if n == EMBED), None)
    for name, _shape, source in plan.names:
        tensor = _merged(name, source, adapter, embed_file)
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        yield name, tensor
        del tensor  # before the next one is merged: one tensor held here, not two


def iter_merged_arrays(base_dir: str | Path, adapter_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """``(hf_name, float32 numpy array)`` pairs: what ``gguf_writer.iter_hf_tensors`` yields for a merged folder."""
    import torch

    for name, tensor in iter_merged_tensors(base_dir, adapter_dir, torch.float32):
        array = tensor.numpy()
        del tensor
        yield name, array
        del array


# ---------------------------------------------------------------- writing a merged folder


def _dirs(source: Union[RunDir, tuple]) -> tuple[Path, Path]:
    """(base_dir, adapter_dir) of a run directory, or the pair given."""
    from .models import base_and_adapter

    return base_and_adapter(source)


def merged_config(base_dir: Path, tied_after: bool, dtype: Any) -> dict:
    """The base config with the tie flag of the merged model and its dtype."""
    config = _config(base_dir)
    config["tie_word_embeddings"] = tied_after
    if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
        config["text_config"]["tie_word_embeddings"] = tied_after
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = str(dtype).replace("torch.", "")
    if not config.get("architectures"):  # save_pretrained names the model class; a bare config may not
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
        config["architectures"] = [name] if name else config.get("architectures")
    return config


def write_skeleton(source: Union[RunDir, tuple], out_dir: str | Path, dtype: Any = None) -> dict:
    """Write the merged model's config.json, generation config and tokenizer (no weights) to ``out_dir``.

    A GGUF writer that takes its tensors from :func:`iter_merged_arrays` reads this folder for the rest.
    Returns ``{"untied_embeddings": bool, "tie_word_embeddings": bool}``.
    """
    import torch

    from .models import load_tokenizer

    base_dir, adapter_dir = _dirs(source)
    plan = merge_plan(base_dir, read_adapter(adapter_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = merged_config(base_dir, plan.tied_after, dtype or torch.float32)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    load_tokenizer(base_dir).save_pretrained(str(out))
    return {"untied_embeddings": plan.untied, "tie_word_embeddings": plan.tied_after}


def for_gguf(source: Union[RunDir, tuple], work_dir: str | Path) -> tuple[Path, Iterator[tuple[str, Any]], dict]:
    """What a GGUF writer needs, without a merged folder on disk.

    Returns the folder with the merged config and tokenizer (no weights) written to ``work_dir``, the
    merged tensors as ``(hf_name, float32 array)`` pairs (what ``gguf_writer.iter_hf_tensors``
    yields for a merged folder, so the F16 GGUF is bit-identical), and the tie decision.
    """
    base_dir, adapter_dir = _dirs(source)
    info = write_skeleton((base_dir, adapter_dir), work_dir)
    return Path(work_dir), iter_merged_arrays(base_dir, adapter_dir), info


def merged_shapes(source: Union[RunDir, tuple]) -> list[tuple[str, tuple]]:
    """``(hf_name, shape)`` of every merged tensor, in the order the iterators yield them (headers only)."""
    base_dir, adapter_dir = _dirs(source)
    return [(name, shape) for name, shape, _ in merge_plan(base_dir, read_adapter(adapter_dir)).names]


def fill_merged(model: Any, source: Union[RunDir, tuple]) -> int:
    """Overwrite a loaded base model's weights with the merged ones, tensor by tensor, in the model's dtype.

    The model is the base loaded with ``from_pretrained`` (any dtype): the merge is computed in
    fp32 as everywhere here and rounded once to that dtype, so in fp32 the model equals the merged
    folder loaded back, without the folder and with one extra tensor in memory instead of a
    second model. A tied base whose embeddings were trained gets its own lm_head. Returns the
    number of tensors written; raises ``KeyError`` when a merged name is not one of the model's
    parameters (a class that renames checkpoint keys).
    """
    import torch

    base_dir, adapter_dir = _dirs(source)
    adapter = read_adapter(adapter_dir)
    plan = merge_plan(base_dir, adapter)
    dtype = next(model.parameters()).dtype
    if plan.untied:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.empty_like(model.get_input_embeddings().weight), requires_grad=False)
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text.tie_word_embeddings = False
    state = model.state_dict(keep_vars=True)
    missing = [name for name, _, _ in plan.names if name not in state]
    if missing:
        raise KeyError(missing[0])
    count = 0
    with torch.no_grad():
        for name, tensor in iter_merged_tensors(base_dir, adapter_dir, dtype, plan=plan):
            state[name].data.copy_(tensor)
            del tensor
            count += 1
    return count


def _shards(specs: list[tuple[str, tuple]], itemsize: dict[str, int], limit: int) -> list[list[tuple[str, tuple]]]:
    """Split the tensors, in order, into shards of at most ``limit`` bytes (one tensor may exceed it alone)."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize[name]
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


_ST_NAMES = {v: k for k, v in _DTYPES.items()}


def _write_shard(path: Path, specs: list[tuple[str, tuple]], st_dtype: dict[str, str], itemsize: dict[str, int],
                 tensors: Iterator[tuple[str, Any]]) -> int:
    """Write one safetensors file: the header from the known shapes, then each tensor as it comes."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize[name]
        header[name] = {"dtype": st_dtype[name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape in specs:
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != tuple(shape):
                raise ExportError(f"internal: expected {name} {shape}, got {got} {tuple(tensor.shape)}")
            handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)
    return offset


def save_tensors(path: Path, tensors: dict[str, Any]) -> int:
    """``tensors`` as one safetensors file, each written straight from its memory (a tensor on a card
    is copied to host memory one at a time, so the host never holds all of them at once)."""
    specs = [(name, tuple(t.shape)) for name, t in tensors.items()]
    st_dtype = {name: _ST_NAMES[str(t.dtype).replace("torch.", "")] for name, t in tensors.items()}
    itemsize = {name: t.element_size() for name, t in tensors.items()}
    return _write_shard(path, specs, st_dtype, itemsize, ((n, t.detach().cpu()) for n, t in tensors.items()))


def write_merged_folder(source: Union[RunDir, tuple], out_dir: str | Path, dtype: Any = None,
                        shard_bytes: int = SHARD_BYTES, log: Callable[[str], None] = print) -> dict:
    """Write the merged model as an HF folder, tensor by tensor, shard by shard.

    ``source``: a :class:`RunDir` (its base model and ``adapter/``) or ``(base_dir, adapter_dir)``.
    ``dtype``: the saved dtype (default float32, what the PEFT merge saved).
    Returns ``{"untied_embeddings", "tie_word_embeddings", "files", "bytes"}``.
    """
    import torch

    dtype = dtype or torch.float32
    base_dir, adapter_dir = _dirs(source)
    adapter = read_adapter(adapter_dir)
    plan = merge_plan(base_dir, adapter)
    out = Path(out_dir)
    record = write_skeleton((base_dir, adapter_dir), out, dtype)
    st_dtype, itemsize = {}, {}
    for name, _shape, f in plan.names:
        stored = f.entries[name]["dtype"] if f is not None else "F32"
        kind = _DTYPES[stored]
        out_kind = str(dtype).replace("torch.", "") if kind.startswith(("float", "bfloat")) else kind
        st_dtype[name] = _ST_NAMES[out_kind]
        itemsize[name] = getattr(torch, out_kind).itemsize
    shards = _shards([(n, s) for n, s, _ in plan.names], itemsize, shard_bytes)
    tensors = iter_merged_tensors(base_dir, adapter_dir, dtype, plan=plan)
    files, total, weight_map = [], 0, {}
    for i, specs in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(out / fname, specs, st_dtype, itemsize, tensors)
        files.append(fname)
        weight_map.update({n: fname for n, _ in specs})
        log(f"[merge] wrote {fname}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {**record, "files": files, "bytes": total}
