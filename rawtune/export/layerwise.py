"""The importance and H pass one transformer layer at a time, on the GPU when there is one.

:func:`rawtune.export.imatrix.collect` runs the whole model forward and backward at once: every
layer's activations stay in memory until the backward pass, and it needs the whole model in
fp32 on one device, so export recorded H matrices only up to 600M parameters. Here the same
numbers come from three sweeps that hold one layer at a time on the device:

1. capture: the model's own forward runs with its decoder layers swapped for stand-ins that record
   what each layer is called with (masks, rotary tables: they do not depend on the hidden states)
   and stop the forward at the last one, so every family's own preprocessing is kept;
2. forward: each layer, moved to the device, reads every calibration block's hidden state and
   writes the next (kept on the CPU, one ``[tokens, hidden]`` array per layer and block);
3. head, then backward: the model's own norm, LM head and loss (the layers replaced by a stand-in
   that hands in the last hidden state) give the loss gradient at the last layer's output; then
   each layer, from the last, is run again from its stored input and back-propagated from its
   output gradient, with the same hooks as the whole-model pass recording importance and H.

On the CPU the arithmetic is the whole-model pass's, op for op, so the result is bit-identical
(``tests/test_imatrix.py``). The H matrices of a layer leave the device as soon as its backward
is done, into float32 arrays that spill to files in a work folder past a RAM budget.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

# H matrices kept in RAM up to this many bytes; the rest are memory-mapped files in the spill folder.
RAM_BUDGET_BYTES = 2 * 2**30


class _Stop(Exception):
    """Raised by the last stand-in: the capture needs nothing after the layers."""


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer ``index``: records its call and passes the hidden state on."""

    def __init__(self, index: int, calls: dict, last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.index] = (args, kwargs)
        if self.index == 0:
            self.calls["input"] = hidden
        if self.last:
            raise _Stop
        return hidden


class _Feeder(torch.nn.Module):
    """Stands in for the last decoder layer: returns the given hidden state (a leaf that takes the gradient)."""

    def __init__(self, hidden: Any) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.hidden


class _Passthrough(torch.nn.Module):
    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden


def layers_of(model: Any, names: dict[str, str]) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the decoder layers the importance names live in."""
    prefixes = {m.group(1) for name in names if (m := re.match(r"^(.*\.layers)\.\d+\.", name))}
    if len(prefixes) != 1:
        raise ValueError(f"cannot find one decoder-layer list among {sorted(prefixes)}")
    prefix = prefixes.pop()
    return prefix, model.get_submodule(prefix)


class _Swapped:
    """The ModuleList's entries replaced by stand-ins while in the ``with`` block."""

    def __init__(self, layers: Any, stand_ins: list) -> None:
        self.layers, self.stand_ins = layers, stand_ins
        self.originals = list(layers._modules.items())

    def __enter__(self) -> "_Swapped":
        for (key, _), stand_in in zip(self.originals, self.stand_ins):
            self.layers._modules[key] = stand_in
        return self

    def __exit__(self, *exc: Any) -> None:
        for key, module in self.originals:
            self.layers._modules[key] = module


def _to(value: Any, device: Any) -> Any:
    """Tensors inside call arguments moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _clean(kwargs: dict) -> dict:
    """No KV cache in a replay: nothing is generated, and a cache would grow with every call."""
    out = dict(kwargs)
    for key in ("past_key_values", "past_key_value"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def collect_layerwise(model: Any, names: dict[str, str], blocks: np.ndarray, device: Any = "cpu",
                      batch_size: int = 1, full: Optional[set] = None,
                      spill_dir: Optional[Path] = None) -> tuple[dict, dict]:
    """The importances and H matrices of :func:`rawtune.export.imatrix.collect`, one layer at a time.

    ``model`` stays where it was loaded (the CPU); the part in use moves to ``device`` and back.
    ``full``: GGUF names whose H is recorded (default :func:`rawtune.export.statistics.layer_hessian_names`:
    by layer width, whatever the model's dtype). ``spill_dir``: where H matrices past
    :data:`RAM_BUDGET_BYTES` are memory-mapped (None: all kept in RAM).
    """
    from .statistics import Stats, layer_hessian_names

    device = torch.device(device)
    modules = dict(model.named_modules())
    prefix, layers = layers_of(model, names)
    full = layer_hessian_names(modules, names) if full is None else full
    batches = [np.asarray(blocks[s:s + batch_size], dtype=np.int64) for s in range(0, len(blocks), batch_size)]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in frozen:
        param.requires_grad_(False)
    home = next(model.parameters()).device
    store = _HessianStore(spill_dir)
    values: dict[str, np.ndarray] = {}
    try:
        calls, first = _capture(model, layers, batches, device)
        hidden = _forward(layers, calls, first, device, home)
        grads = _head_grads(model, layers, batches, hidden[-1], device, home)
        for index in reversed(range(len(layers))):
            layer_names = {n: k for n, k in names.items() if n.startswith(f"{prefix}.{index}.")}
            stats = Stats({k for k in layer_names.values() if k in full})
            grads = _backward(layers[index], modules, layer_names, stats, [c[index] for c in calls],
                              hidden[index], grads, device, home)
            hidden[index] = None
            values.update(stats.values())
            for key, h in stats.hessians().items():
                store.put(key, h)
    finally:
        for param, flag in frozen:
            param.requires_grad_(flag)
    return values, store.items


def _capture(model: Any, layers: Any, batches: list, device: Any) -> tuple[list, list]:
    """Per batch: each layer's call arguments (on ``device``), and the first layer's input (at home)."""
    embed = model.get_input_embeddings()
    n = len(layers)
    calls, inputs = [], []
    for ids in batches:
        record: dict = {}
        with _Swapped(layers, [_Recorder(i, record, i == n - 1) for i in range(n)]), torch.no_grad():
            try:
                ids_t = torch.as_tensor(ids)
                model(inputs_embeds=embed(ids_t), labels=ids_t)
            except _Stop:
                pass
        inputs.append(record["input"].detach())
        calls.append([(_to(record[i][0], device), _to(_clean(record[i][1]), device)) for i in range(n)])
    return calls, inputs


def _forward(layers: Any, calls: list, first: list, device: Any, home: Any) -> list:
    """hidden[i][b]: the input of layer i for batch b (at home); hidden[n]: the last layer's output."""
    hidden = [first]
    for index, layer in enumerate(layers):
        layer.to(device)
        outputs = []
        with torch.no_grad():
            for b, x in enumerate(hidden[index]):
                args, kwargs = calls[b][index]
                out = layer(x.to(device), *args, **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out).to(home))
        layer.to(home)
        hidden.append(outputs)
    return hidden


def _head_grads(model: Any, layers: Any, batches: list, last: list, device: Any, home: Any) -> list:
    """The loss gradient at the last layer's output, per batch, through the model's own norm, head and loss."""
    embed = model.get_input_embeddings()
    n = len(layers)
    grads = []
    with _Swapped(layers, [_Passthrough() for _ in range(n)]):
        model.to(device)  # everything but the layers (they are out of the model while swapped)
        try:
            for ids, h in zip(batches, last):
                leaf = h.to(device).detach().requires_grad_(True)
                layers._modules[str(n - 1)] = _Feeder(leaf)
                ids_t = torch.as_tensor(ids, device=device)
                model(inputs_embeds=embed(ids_t).detach(), labels=ids_t).loss.backward()
                grads.append(leaf.grad.detach())
        finally:
            model.to(home)
    return grads


def _backward(layer: Any, modules: dict, layer_names: dict, stats: Any, calls: list, inputs: list, grads: list,
              device: Any, home: Any) -> list:
    """Back-propagate each batch's output gradient through ``layer``, recording its linears' stats;
    return the gradient at its input."""
    layer.to(device)
    handles = [modules[n].register_forward_hook(stats.hook(key)) for n, key in layer_names.items()]
    out_grads = []
    try:
        for (args, kwargs), x, g in zip(calls, inputs, grads):
            leaf = x.to(device).detach().requires_grad_(True)
            out = layer(leaf, *args, **kwargs)
            (out[0] if isinstance(out, tuple) else out).backward(g.to(device))
            out_grads.append(leaf.grad.detach())
    finally:
        for handle in handles:
            handle.remove()
        layer.to(home)
    return out_grads


class _HessianStore:
    """float32 H matrices in RAM up to :data:`RAM_BUDGET_BYTES`, then as .npy files in ``spill_dir``."""

    def __init__(self, spill_dir: Optional[Path]) -> None:
        self.spill_dir, self.items, self.bytes = spill_dir, {}, 0

    def put(self, key: str, h: np.ndarray) -> None:
        h = np.asarray(h, dtype=np.float32)
        if self.spill_dir is None or self.bytes + h.nbytes <= RAM_BUDGET_BYTES:
            self.items[key] = h
            self.bytes += h.nbytes
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{key}.h.npy"
        np.save(path, h)
        self.items[key] = np.load(path, mmap_mode="r")
