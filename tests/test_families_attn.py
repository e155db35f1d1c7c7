"""What is special in the attention families OLMo 3, EXAONE 4 and Gemma 4, beyond the shared family tests.

OLMo 3 is written as llama.cpp's ``olmo2`` with a sliding-window pattern and YaRN on its
full-attention layers only: each of the two is shown to matter (left out, llama.cpp's logits
leave PyTorch's), and the RoPE settings olmo2's graph cannot express are refused. EXAONE 4's
32B layout (three sliding layers with RoPE, one global layer without) runs in llama.cpp only
at 64 layers: the 64-layer tiny model matches PyTorch, its pattern left out does not, and the
same layout at another depth is refused before training and at export, naming the llama.cpp
version. Gemma 4's 31B layout (keys as values, per-kind KV heads, no per-layer embeddings) matches
too, its proportional RoPE factors are shown to matter, and its experts model is refused before
training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from families import build_family
from rawtune import families as registry
from rawtune.errors import ExportError, TrainError
from rawtune.export import gguf_writer
from test_families import F16_TOL, F32_TOL, mixed_tokens, relative_error, scramble, torch_logits
from tiny import gguf_logits

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _with_hparams(monkeypatch, name: str, hparams) -> None:
    """The writer sees family ``name`` with other hparams (a converter that forgets something)."""
    family = registry.family_named(name)
    changed = dataclasses.replace(family, gguf=dataclasses.replace(family.gguf, hparams=hparams))
    monkeypatch.setattr(gguf_writer, "family_of", lambda config: (family.hf_architectures[0], changed))


def _scrambled_case(tmp_path_factory, name: str, seed: int) -> tuple:
    """(model folder, tokens, PyTorch logits) of a tiny family model with scrambled weights."""
    model_dir = build_family(name, tmp_path_factory.mktemp(name))
    scramble(model_dir, seed=seed)
    tokens = mixed_tokens(model_dir)
    return model_dir, tokens, torch_logits(model_dir, tokens)


@pytest.fixture(scope="module")
def olmo3(tmp_path_factory):
    return _scrambled_case(tmp_path_factory, "olmo3", 51)


@pytest.mark.parametrize("left_out", ["yarn", "window"])
def test_olmo3_yarn_and_sliding_window_matter(left_out, olmo3, tmp_path, monkeypatch):
    from rawtune.families import olmo3 as module
    from rawtune.families.hooks import layer_types, swa_pattern

    model_dir, tokens, want = olmo3
    good = tmp_path / "good.gguf"
    gguf_writer.convert(model_dir, good, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(good, tokens), want) < F32_TOL

    def without_yarn(writer, config, shape):
        swa_pattern(writer, config, layer_types(config, shape, default_every=4))

    def without_window(writer, config, shape):
        module.yarn_hparams(writer, config["rope_parameters"]["full_attention"])

    _with_hparams(monkeypatch, "olmo3", without_yarn if left_out == "yarn" else without_window)
    bad = tmp_path / "bad.gguf"
    gguf_writer.convert(model_dir, bad, "f32", log=lambda s: None)
    err = relative_error(gguf_logits(bad, tokens), want)
    print(f"\n[olmo3] {left_out} left out: {err:.3f} relative")
    assert err > F16_TOL


def test_olmo3_yarn_attention_factor_other_than_the_default(tmp_path):
    """A YaRN cos/sin scale other than 0.1 ln(factor) + 1 is written as llama.cpp's extra attention factor."""
    model_dir = build_family("olmo3", tmp_path / "o3")
    scramble(model_dir, seed=52)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"]["full_attention"]["attention_factor"] = 1.5
    (model_dir / "config.json").write_text(json.dumps(config))
    tokens = mixed_tokens(model_dir)
    want = torch_logits(model_dir, tokens)
    out = tmp_path / "o3.gguf"
    gguf_writer.convert(model_dir, out, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(out, tokens), want) < F32_TOL


@pytest.mark.parametrize("change,match", [
    ({"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, "one base for all layers"),
    ({"sliding_attention": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}}, "plain RoPE"),
    ({"full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                         "original_max_position_embeddings": 64, "truncate": False}}, "truncate false"),
])
def test_olmo3_rope_llama_cpp_cannot_express_is_refused(change, match, tmp_path):
    model_dir = build_family("olmo3", tmp_path / "o3")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"].update(change)
    (model_dir / "config.json").write_text(json.dumps(config))
    assert match in (registry.refusal(config, frozenset()) or "")  # before training too
    with pytest.raises(ExportError, match=match):
        gguf_writer.convert(model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_olmo3_without_sliding_layers_writes_no_window(tmp_path):
    """Every layer full (as OLMo 2): no window keys, and YaRN then applies to every layer, as in PyTorch."""
    import gguf

    model_dir = build_family("olmo3", tmp_path / "o3")
    scramble(model_dir, seed=53)
    _edit_config(model_dir, layer_types=["full_attention"] * 4)
    tokens = mixed_tokens(model_dir)
    out = tmp_path / "o3.gguf"
    gguf_writer.convert(model_dir, out, "f32", log=lambda s: None)
    assert "olmo2.attention.sliding_window" not in gguf.GGUFReader(str(out)).fields
    assert relative_error(gguf_logits(out, tokens), torch_logits(model_dir, tokens)) < F32_TOL


@pytest.fixture(scope="module")
def exaone4_hybrid(tmp_path_factory):
    return _scrambled_case(tmp_path_factory, "exaone4hybrid", 54)


def test_exaone4_hybrid_at_64_layers(exaone4_hybrid, tmp_path, monkeypatch):
    """The 32B layout: F16/F32 parity; written without its window pattern llama.cpp runs it differently."""
    model_dir, tokens, want = exaone4_hybrid
    f16, f32 = tmp_path / "h.F16.gguf", tmp_path / "h.F32.gguf"
    gguf_writer.convert(model_dir, f16, "f16", log=lambda s: None)
    gguf_writer.convert(model_dir, f32, "f32", log=lambda s: None)
    err16, err32 = relative_error(gguf_logits(f16, tokens), want), relative_error(gguf_logits(f32, tokens), want)
    print(f"\n[exaone4 hybrid, 64 layers] F16 {err16:.1e}, F32 {err32:.1e} relative")
    assert err16 < F16_TOL and err32 < F32_TOL
    # Without the keys llama.cpp falls back to its own default pattern (every 4th global, window 4096):
    # a window longer than the text, so the sliding layers see everything.
    _with_hparams(monkeypatch, "exaone4", None)
    bad = tmp_path / "bad.gguf"
    gguf_writer.convert(model_dir, bad, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(bad, tokens), want) > F16_TOL


@pytest.mark.parametrize("layers", [8, 64])
def test_exaone4_layout_llama_cpp_runs_differently_is_refused(layers, tmp_path, tiny_corpus):
    """A hybrid of another depth, or 64 layers without a window: refused before training and at export."""
    from conftest import train_tiny

    model_dir = build_family("exaone4", tmp_path / "e4")
    if layers == 8:
        _edit_config(model_dir, num_hidden_layers=8, sliding_window=8, sliding_window_pattern="LLLG",
                     layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
                     + ["full_attention"])
    else:
        _edit_config(model_dir, num_hidden_layers=64, layer_types=["full_attention"] * 64)
    reason = registry.refusal(json.loads((model_dir / "config.json").read_text()), frozenset())
    assert reason and "llama-cpp-python 0.3.36" in reason and "64" in reason
    with pytest.raises(TrainError, match="llama-cpp-python 0.3.36"):
        train_tiny(tmp_path / "run", model_dir, tiny_corpus, max_steps=1, backend="peft")
    assert not (tmp_path / "run" / "adapter").exists()
    with pytest.raises(ExportError, match="llama-cpp-python 0.3.36"):
        gguf_writer.convert(model_dir, tmp_path / "x.gguf")


def test_exaone4_window_with_every_layer_global_is_refused(tmp_path):
    """transformers leaves RoPE out of global layers whenever a window is set; llama.cpp's 30-layer graph does not."""
    model_dir = build_family("exaone4", tmp_path / "e4")
    _edit_config(model_dir, sliding_window=4096)
    with pytest.raises(ExportError, match="every layer global"):
        gguf_writer.convert(model_dir, tmp_path / "x.gguf")


def test_gemma4_31b_layout(tmp_path):
    """Keys as values on full layers (no v_proj), fewer KV heads there, no per-layer embeddings: F16/F32 parity
    and the per-layer KV head counts in the file."""
    import gguf

    model_dir = build_family("gemma4dense", tmp_path / "g4")
    scramble(model_dir, seed=55)
    tokens = mixed_tokens(model_dir)
    f16, f32 = tmp_path / "g4.F16.gguf", tmp_path / "g4.F32.gguf"
    gguf_writer.convert(model_dir, f16, "f16", log=lambda s: None)
    gguf_writer.convert(model_dir, f32, "f32", log=lambda s: None)
    err16 = relative_error(gguf_logits(f16, tokens), torch_logits(model_dir, tokens))
    err32 = relative_error(gguf_logits(f32, tokens), torch_logits(model_dir, tokens, ggml_gelu=True))
    print(f"\n[gemma4 31B layout] F16 {err16:.1e}, F32 {err32:.1e} relative")
    assert err16 < F16_TOL and err32 < F32_TOL
    field = gguf.GGUFReader(str(f32)).fields["gemma4.attention.head_count_kv"]
    assert [int(field.parts[i][0]) for i in field.data] == [2] * 5 + [1]


def test_gemma4_proportional_rope_factors_matter(tmp_path, monkeypatch):
    """Without the 1e30 factors llama.cpp would turn every pair of the full layers' heads."""
    import numpy as np

    model_dir = build_family("gemma4", tmp_path / "g4")
    scramble(model_dir, seed=56)
    tokens = mixed_tokens(model_dir)
    family = registry.family_named("gemma4")

    def all_turning(config, shape, rope_type):
        return {"rope_freqs.weight": np.ones(32, dtype=np.float32)}

    changed = dataclasses.replace(family, gguf=dataclasses.replace(family.gguf, extra_tensors=all_turning))
    monkeypatch.setattr(gguf_writer, "family_of", lambda config: ("Gemma4ForCausalLM", changed))
    bad = tmp_path / "bad.gguf"
    gguf_writer.convert(model_dir, bad, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(bad, tokens), torch_logits(model_dir, tokens, ggml_gelu=True)) > F16_TOL


def test_gemma4_experts_are_refused_before_training(tmp_path, tiny_corpus):
    from conftest import train_tiny

    model_dir = build_family("gemma4", tmp_path / "g4")
    _edit_config(model_dir, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    assert "26B A4B" in registry.refusal(json.loads((model_dir / "config.json").read_text()), frozenset())
    with pytest.raises(TrainError, match="expert layout"):
        train_tiny(tmp_path / "run", model_dir, tiny_corpus, max_steps=1, backend="peft")
    with pytest.raises(ExportError, match="expert layout"):
        gguf_writer.convert(model_dir, tmp_path / "x.gguf")
