"""What is special about Granite 4.0-H (Mamba-2 beside attention) and gpt-oss (refused for now).

The shared family tests (tests/test_families.py) check Granite 4.0-H's logits, tokenizer and
quantized files; here: the Mamba tensors in llama.cpp's shapes with a negative control (A
written as its logarithm), the per-layer KV head counts that tell llama.cpp the layer kinds,
the checkpoints refused before training, the LoRA targets per preset, and gpt-oss's refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from families import build_family
from rawtune import families
from rawtune.errors import ExportError
from rawtune.families import granitehybrid
from tiny import gguf_logits

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from rawtune.export import gguf_writer  # noqa: E402
from test_families import F16_TOL, F32_TOL, mixed_tokens, relative_error, scramble, torch_logits  # noqa: E402


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    path = build_family("granitehybrid", tmp_path_factory.mktemp("granitehybrid"))
    scramble(path, seed=51)
    return path


def _tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def test_mamba_tensors_and_layer_kinds(hybrid, tmp_path):
    """A = -exp(A_log) as [heads, 1], the gated norm per group, gate/up split, head_count_kv 0 on Mamba layers."""
    import gguf
    from safetensors.numpy import load_file

    out = tmp_path / "h.gguf"
    gguf_writer.convert(hybrid, out, "f32", log=lambda s: None)
    reader = gguf.GGUFReader(str(out))
    kv = reader.fields["granitehybrid.attention.head_count_kv"]
    assert [int(kv.parts[i][0]) for i in kv.data] == [0, 2, 0, 0]  # layer_types mamba, attention, mamba, mamba
    ff = reader.fields["granitehybrid.feed_forward_length"]
    assert int(ff.parts[ff.data[0]][0]) == 170  # the shared MLP's width
    hf = load_file(str(hybrid / "model.safetensors"))
    a_log = hf["model.layers.0.mamba.A_log"]
    np.testing.assert_allclose(_tensor(reader, "blk.0.ssm_a"), -np.exp(a_log)[:, None], rtol=1e-6)
    assert _tensor(reader, "blk.0.ssm_norm.weight").shape == (1, 128)
    assert _tensor(reader, "blk.0.ssm_conv1d.weight").shape == (128 + 2 * 32, 4)
    fused = hf["model.layers.1.shared_mlp.input_linear.weight"]
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_gate.weight"), fused[:170])
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_up.weight"), fused[170:])
    assert not any(t.name.startswith("blk.0.attn_q") for t in reader.tensors)  # a Mamba layer has no attention


def test_mamba_negative_control(hybrid, tmp_path, monkeypatch):
    """A written as its logarithm (what a plain name-map converter would do) fails the logits check."""
    tokens = mixed_tokens(hybrid)
    want = torch_logits(hybrid, tokens)
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    gguf_writer.convert(hybrid, good, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(good, tokens), want) < F32_TOL
    monkeypatch.setattr(granitehybrid, "a_from_log", lambda a_log: a_log)
    gguf_writer.convert(hybrid, bad, "f32", log=lambda s: None)
    err = relative_error(gguf_logits(bad, tokens), want)
    assert not err <= F16_TOL, err  # a positive decay makes the state grow: NaN or far-off logits both fail


@pytest.mark.parametrize("change,match", [
    ({"num_local_experts": 4, "num_experts_per_tok": 2}, "mixture-of-experts"),
    ({"mamba_expand": 3}, "expansion of 2"),
    ({"mamba_n_groups": 2}, "per group"),
    ({"mamba_proj_bias": True}, "biases"),
    ({"time_step_limit": [0.001, 0.1]}, "time step"),
    ({"position_embedding_type": "rope"}, "RoPE"),
])
def test_refused_before_training(change, match, hybrid, tmp_path):
    """What llama.cpp's granitehybrid cannot run is refused by the registry (before training) and by export,
    naming the llama.cpp release."""
    config = json.loads((hybrid / "config.json").read_text())
    assert families.refusal(config, frozenset()) is None
    config.update(change)
    reason = families.refusal(config, frozenset())
    assert reason is not None and match in reason
    if "experts" not in match:  # the MoE sizes are rawtune's own gap, the others llama.cpp's
        assert "llama-cpp-python 0.3.36" in reason
    changed = tmp_path / "changed"
    changed.mkdir()
    for item in hybrid.iterdir():
        (changed / item.name).write_bytes(item.read_bytes())
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=match):
        gguf_writer.convert(changed, tmp_path / "x.gguf", "f32", log=lambda s: None)
    assert not (tmp_path / "x.gguf").exists()


def test_lora_targets_per_preset():
    """Llama's names select Granite 4.0-H's attention and shared MLP; standard/thorough add the Mamba mixer."""
    family = families.family_named("granitehybrid")
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear", "in_proj", "out_proj",
             "conv1d", "norm"}
    requested = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = ["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear"]
    assert families.lora_targets(family, requested, names, "quick") == base
    assert families.lora_targets(family, requested, names, "standard") == base + ["in_proj", "out_proj"]
    assert families.lora_targets(family, requested, names, "thorough") == base + ["in_proj", "out_proj"]


def test_gpt_oss_refused_before_training():
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}
    reason = families.refusal(config, frozenset())
    assert reason is not None and "gpt-oss" in reason and "llama-cpp-python 0.3.36" in reason
    assert families.family_named("gptoss").gguf is None
