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


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory) -> Path:
    path = build_family("gptoss", tmp_path_factory.mktemp("gptoss"))
    scramble(path, seed=12)  # the family tests' seed for gpt-oss
    return path


def test_gpt_oss_expert_layout(gptoss, tmp_path):
    """llama.cpp's stacked experts: gate and up taken apart by stride (HF interleaves them), [experts, out, in]."""
    import gguf
    from safetensors.numpy import load_file

    out = tmp_path / "g.gguf"
    gguf_writer.convert(gptoss, out, "f32", log=lambda s: None)
    reader = gguf.GGUFReader(str(out))
    hf = load_file(str(gptoss / "model.safetensors"))
    gate_up = hf["model.layers.1.mlp.experts.gate_up_proj"]  # [experts, hidden, 2 * ffn]
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_gate_exps.weight"), gate_up[..., ::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_up_exps.weight"), gate_up[..., 1::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_down_exps.weight"),
                                  hf["model.layers.1.mlp.experts.down_proj"].transpose(0, 2, 1))
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_gate_exps.bias"),
                                  hf["model.layers.1.mlp.experts.gate_up_proj_bias"][:, ::2])
    np.testing.assert_array_equal(_tensor(reader, "blk.1.attn_sinks.weight"), hf["model.layers.1.self_attn.sinks"])
    swa = reader.fields["gpt-oss.attention.sliding_window_pattern"]
    assert [bool(swa.parts[i][0]) for i in swa.data] == [True, False, True, False]


def test_gpt_oss_routing_depends_on_tokens(gptoss):
    """The test model's routers (given clear preferences by the family tests' scramble) still route
    different tokens to different experts, so the logits checks cover routing."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gptoss, dtype=torch.float32).eval()
    chosen = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: chosen.append(o[2]))
             for layer in model.model.layers]
    with torch.inference_mode():
        model(torch.as_tensor(mixed_tokens(gptoss)[None, :]))
    for hook in hooks:
        hook.remove()
    distinct = [len({tuple(sorted(row.tolist())) for row in layer}) for layer in chosen]
    assert sum(d >= 2 for d in distinct) >= 3, distinct


def test_gpt_oss_published_yarn_rounding_differs_in_llama_cpp(gptoss, tmp_path):
    """gpt-oss's config says YaRN ``truncate: false``; llama.cpp always rounds the correction range to
    whole dimensions. Measured here: with the published setting llama.cpp's logits leave the F16
    tolerance or nearly so on the tiny model (1.2e-2 relative), with ``truncate: true`` (the test model)
    they match to 2e-6. A known
    difference of llama.cpp, recorded rather than refused (every llama.cpp user runs gpt-oss so)."""
    config = json.loads((gptoss / "config.json").read_text())
    assert config["rope_parameters"]["truncate"] is True
    published = tmp_path / "published"
    published.mkdir()
    for item in gptoss.iterdir():
        (published / item.name).write_bytes(item.read_bytes())
    config["rope_parameters"]["truncate"] = False
    (published / "config.json").write_text(json.dumps(config))
    tokens = mixed_tokens(gptoss)
    out = tmp_path / "p.gguf"
    gguf_writer.convert(published, out, "f32", log=lambda s: None)
    err = relative_error(gguf_logits(out, tokens), torch_logits(published, tokens))
    same = tmp_path / "same.gguf"
    gguf_writer.convert(gptoss, same, "f32", log=lambda s: None)
    err_same = relative_error(gguf_logits(same, tokens), torch_logits(gptoss, tokens))
    print(f"\n[gpt-oss] llama.cpp F32 vs transformers: YaRN truncate false {err:.2e} rel, true {err_same:.2e} rel")
    assert err_same < F32_TOL and err > 100 * err_same


def test_gpt_oss_mxfp4_original_refused_before_training():
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
              "quantization_config": {"quant_method": "mxfp4"}}
    reason = families.refusal(config, frozenset())
    assert reason is not None and "MXFP4" in reason and "BF16" in reason
    assert families.refusal({"architectures": ["GptOssForCausalLM"]}, frozenset()) is None


def test_granitehybrid_standard_preset_trains_the_mamba_mixer(hybrid, tmp_path, tiny_corpus):
    """With the standard preset LoRA lands on the Mamba in/out projections and the shared MLP, and on the
    CPU (PyTorch path) out_proj's adapter is trained too."""
    from safetensors.numpy import load_file

    from conftest import train_tiny

    run = train_tiny(tmp_path / "run", hybrid, tiny_corpus, preset="standard", seq_len=64, batch_size=2,
                     grad_accum=1, max_steps=2, warmup_ratio=0.0, learning_rate=1e-2, lora_r=4,
                     train_embeddings=False, stages=["data", "train"])
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "input_linear",
                                             "output_linear", "in_proj", "out_proj"}
    weights = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    out_b = [v for k, v in weights.items() if "mamba.out_proj.lora_B" in k]
    assert len(out_b) == 3 and all(np.abs(v).max() > 0 for v in out_b)  # three Mamba layers, B moved from 0


def test_gpt_oss_published_template_falls_back_to_completion(tmp_path):
    """The published harmony template writes today's date and a system preamble into every prompt, which
    rawtune's Ollama translation cannot express: export then writes the completion template and says so."""
    from families import TEMPLATE_DIR, build_tokenizer
    from rawtune.export import ollama

    tok = build_tokenizer("gptoss", tmp_path / "tok")
    tok.chat_template = (TEMPLATE_DIR / "gptoss.jinja").read_text(encoding="utf-8")
    lines: list[str] = []
    assert ollama.chat_format_for(tok, False, log=lines.append) is None
    assert any("completion template" in line for line in lines), lines


def test_gpt_oss_expert_lora_streamed_merge_equals_peft(gptoss, tmp_path):
    """rawtune's tensor-by-tensor merge folds expert LoRA (PEFT's target_parameters, nested wrappers)
    exactly as PEFT's merge_and_unload does; a swapped A/B pairing of the two expert matrices is caught."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rawtune import streamed
    from rawtune.settings import TrainSettings
    from rawtune.train.hf_loop import family_parameters, peft_config, with_model_targets

    model = AutoModelForCausalLM.from_pretrained(gptoss, dtype=torch.float32)
    t = TrainSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False, train_embeddings=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    parameters = family_parameters(model, t)
    assert parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    t = with_model_targets(model, t)
    assert t.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, peft_config(t, parameters))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained-looking adapter (B starts at zero)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    want = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    got = dict(streamed.iter_merged_arrays(gptoss, adapter))
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.1.self_attn.q_proj.weight"):
        base = AutoModelForCausalLM.from_pretrained(gptoss, dtype=torch.float32).state_dict()[name]
        assert not torch.allclose(want[name], base)  # the adapter changes this tensor
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=0, atol=1e-5)
    # Negative control: the nesting read the other way round pairs each expert matrix with the other's LoRA.
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_parameters"] = list(reversed(config["target_parameters"]))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not fit"):
        dict(streamed.iter_merged_arrays(gptoss, adapter))
