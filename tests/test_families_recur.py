"""What is special about LFM2 (short convolutions) and Qwen3.5 (Gated DeltaNet linear attention).

The shared family tests (test_families.py, test_family_train.py, test_templates.py) cover both
families like the others. Here: the hyperparameters llama.cpp needs to tell the layer kinds apart,
a negative control per Qwen3.5 weight transform (each one left out, llama.cpp's logits no longer
follow PyTorch's), the LoRA targets per layer kind, and the checkpoints llama.cpp cannot run,
refused before training with the llama.cpp version named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from families import build_family
from rawtune import families
from rawtune.errors import ExportError, TrainError
from rawtune.export import gguf_writer
from rawtune.families import lfm2, qwen35
from rawtune.settings import ALL_PROJECTIONS
from tiny import gguf_logits

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from test_families import F16_TOL, F32_TOL, mixed_tokens, relative_error, scramble, torch_logits  # noqa: E402


@pytest.fixture(scope="module")
def scrambled(tmp_path_factory):
    """A tiny family model with large random weights and its PyTorch logits, built once per family."""
    cache = {}

    def get(name):
        if name not in cache:
            path = build_family(name, tmp_path_factory.mktemp(f"recur-{name}"))
            scramble(path, seed=7)
            tokens = mixed_tokens(path)
            cache[name] = (path, tokens, torch_logits(path, tokens))
        return cache[name]
    return get


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("lfm2.", "qwen35.")):
            values = [field.parts[i].tolist() for i in field.data]
            out[key.split(".", 1)[1]] = [v[0] if len(v) == 1 else v for v in values]
    out["types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


def test_lfm2_layer_kinds_and_mlp_width_in_the_gguf(scrambled, tmp_path):
    """Convolution layers have no KV heads, the MLP width is the adjusted one, the kernel stays float32."""
    path, tokens, want = scrambled("lfm2")
    out = tmp_path / "l.gguf"
    gguf_writer.convert(path, out, "f16", log=lambda s: None)
    fields = _fields(out)
    assert fields["attention.head_count_kv"] == [0, 0, 2, 0]  # conv, conv, full_attention, conv
    assert fields["feed_forward_length"] == [288]  # block_ff_dim 416 -> 2/3 -> multiple of 32
    assert fields["shortconv.l_cache"] == [3]
    assert fields["types"]["blk.0.shortconv.conv.weight"] == "F32"
    assert fields["types"]["blk.0.shortconv.in_proj.weight"] == "F16"
    assert "token_embd_norm.weight" in fields["types"] and "output_norm.weight" not in fields["types"]
    assert relative_error(gguf_logits(out, tokens), want) < F16_TOL


def test_lfm2_every_layer_as_attention_is_caught(scrambled, tmp_path, monkeypatch):
    """Negative control: one KV head count for every layer makes llama.cpp read convolution layers as
    attention, and the file no longer loads (their q/k/v tensors do not exist)."""
    path, tokens, _ = scrambled("lfm2")
    monkeypatch.setattr(lfm2, "layer_kinds", lambda config: ["full_attention"] * 4)
    with pytest.raises(ExportError, match="missing"):
        gguf_writer.convert(path, tmp_path / "bad.gguf", "f32", log=lambda s: None)


def test_qwen35_hparams_in_the_gguf(scrambled, tmp_path):
    path, _, _ = scrambled("qwen35")
    out = tmp_path / "q.gguf"
    gguf_writer.convert(path, out, "f16", log=lambda s: None)
    fields = _fields(out)
    assert fields["ssm.state_size"] == [16] and fields["ssm.group_count"] == [2]
    assert fields["ssm.time_step_rank"] == [4] and fields["ssm.inner_size"] == [64]
    assert fields["ssm.conv_kernel"] == [4]
    assert fields["attention.recurrent_layers"] == [True, True, True, False]
    assert fields["rope.dimension_count"] == [8]  # a quarter of the 32-wide head
    assert fields["rope.dimension_sections"] == [11, 11, 10, 0]
    assert fields["types"]["blk.0.ssm_conv1d.weight"] == "F32"
    assert fields["types"]["blk.0.ssm_a"] == "F32"


# Each Qwen3.5 transform left out: (module attribute, stand-in).
BROKEN = {
    "norms (1 + w)": ("NORM_OFFSET", 0.0),
    "A_log as -exp": ("decay", lambda a: a),
    "value heads tiled": ("_tiled", lambda n, k_heads, per_k, head: np.arange(n)),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_qwen35_each_transform_matters(what, scrambled, tmp_path, monkeypatch):
    """With the transforms llama.cpp's F32 logits follow PyTorch's; without any one of them they do not."""
    path, tokens, want = scrambled("qwen35")
    good = tmp_path / "good.gguf"
    gguf_writer.convert(path, good, "f32", log=lambda s: None)
    assert relative_error(gguf_logits(good, tokens), want) < F32_TOL
    attribute, stand_in = BROKEN[what]
    monkeypatch.setattr(qwen35, attribute, stand_in)
    bad = tmp_path / "bad.gguf"
    gguf_writer.convert(path, bad, "f32", log=lambda s: None)
    err = relative_error(gguf_logits(bad, tokens), want)
    print(f"\n[qwen35] without {what}: {err:.3f} relative logits error")
    assert not np.isfinite(err) or err > F16_TOL  # NaN logits (a decay that grows) are a mismatch too


def _module_names(name: str, path: Path) -> set[str]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}


@pytest.mark.parametrize("name,preset,requested,expected", [
    ("lfm2", "standard", ALL_PROJECTIONS, ["q_proj", "k_proj", "v_proj", "out_proj", "w1", "w3", "w2", "in_proj"]),
    ("lfm2", None, ["o_proj", "down_proj"], ["out_proj", "w2"]),
    ("qwen35", "standard", ALL_PROJECTIONS, ALL_PROJECTIONS + ["in_proj_qkv", "in_proj_z", "out_proj"]),
    ("qwen35", None, ["q_proj"], ["q_proj"]),
])
def test_lora_targets_per_layer_kind(name, preset, requested, expected, scrambled):
    """The presets' Llama names become the family's own, and every preset adds the new layer kind."""
    path, _, _ = scrambled(name)
    family = families.family_for_arch(json.loads((path / "config.json").read_text())["architectures"][0])
    assert families.lora_targets(family, list(requested), _module_names(name, path), preset) == expected


def _with_config(name: str, path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name,changes,match", [
    ("lfm2", {"conv_bias": True}, "convolution biases"),
    ("qwen35", {"linear_value_head_dim": 32}, "different sizes"),
    ("qwen35", {"attention_bias": True}, "attention biases"),
])
def test_what_llama_cpp_cannot_run_is_refused_before_training(name, changes, match, tmp_path, tiny_corpus):
    from conftest import train_tiny

    path = _with_config(name, build_family(name, tmp_path / "m"), **changes)
    with pytest.raises(TrainError, match=match) as info:
        train_tiny(tmp_path / "r", path, tiny_corpus, max_steps=1, backend="peft")
    assert "llama-cpp-python 0.3.36" in str(info.value)
    assert not (tmp_path / "r" / "adapter").exists()
    with pytest.raises(ExportError, match=match):
        gguf_writer.convert(path, tmp_path / "x.gguf", "f16", log=lambda s: None)


def test_qwen35_mrope_sections_that_skip_a_rotated_pair_are_refused():
    """llama.cpp rotates a pair by the text position only if its section is t, h or w; a layout
    that leaves one to the fourth (0 for text) would run differently, so export refuses it."""
    from rawtune.families.base import Shape

    real = Shape(n_layer=24, n_head=8, n_head_kv=2, n_embd=1024, head_dim=256, rope_dim=64, vocab_size=10, tied=True)
    qwen35.check({"num_hidden_layers": 24, "rope_parameters": {"mrope_section": [11, 11, 10]}}, real)
    tiny = Shape(n_layer=4, n_head=4, n_head_kv=2, n_embd=64, head_dim=32, rope_dim=8, vocab_size=10, tied=True)
    with pytest.raises(ExportError, match="extra position"):
        qwen35.check({"num_hidden_layers": 4, "rope_parameters": {"mrope_section": [1, 0, 1]}}, tiny)


def test_known_models_and_planner_shapes():
    """The registry knows the Hub ids with sizes, and the planner has shapes for them."""
    for repo in ("LiquidAI/LFM2-350M", "LiquidAI/LFM2-1.2B", "Qwen/Qwen3.5-0.8B-Base", "Qwen/Qwen3.5-9B-Base"):
        model = families.known_model(repo)
        assert model is not None and model.params > 1e8, repo
        shape = families.planner_shape(repo)
        assert shape["hidden_size"] == model.dims.hidden and shape["model_type"] in ("lfm2", "qwen3_5_text")


def test_qwen35_importance_follows_the_tiled_columns(scrambled, tmp_path):
    """The importance matrix (per input column) of out_proj is in the GGUF tensor's column order.

    The column each GGUF column came from is read off the written F32 tensor itself, so the check
    does not restate the reordering formula: with the importances left in the HF order the entry
    would weight the wrong columns.
    """
    import gguf
    import torch
    from safetensors import safe_open

    from rawtune.export import imatrix

    path, _, _ = scrambled("qwen35")
    out = tmp_path / "q.gguf"
    gguf_writer.convert(path, out, "f32", log=lambda s: None)
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}["blk.0.ssm_out.weight"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        hf = f.get_tensor("model.layers.0.linear_attn.out_proj.weight").numpy()
    source = [int(np.flatnonzero((hf == written[:, [j]]).all(axis=0))[0]) for j in range(hf.shape[1])]
    assert source != sorted(source)  # the value heads were moved

    blocks = mixed_tokens(path, n=32)[None, :]
    got = imatrix.compute(path, blocks, "test")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    raw, raw_h = imatrix.collect(model, {"model.layers.0.linear_attn.out_proj": "x"}, blocks)
    np.testing.assert_allclose(got.values["blk.0.ssm_out.weight"], raw["x"][source], rtol=1e-5)
    assert not np.allclose(got.values["blk.0.ssm_out.weight"], raw["x"], rtol=1e-3)
    # Export's pass runs one layer at a time, which rounds Qwen3.5's linear attention differently from
    # the whole-model forward in the last bits: entries near zero differ by ~1e-7 absolute.
    want_h = raw_h["x"][np.ix_(source, source)]
    np.testing.assert_allclose(got.hessians["blk.0.ssm_out.weight"], want_h, rtol=1e-4, atol=1e-6 * np.abs(want_h).max())


def _vision_language_checkpoint(text_dir: Path, out: Path) -> Path:
    """A tiny Qwen3.5 vision-language checkpoint (the Hub models' layout: the text model under
    model.language_model, a vision tower, a multi-token-prediction head) around a text model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = json.loads((text_dir / "config.json").read_text())
    text = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "dtype")}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=1, temporal_patch_size=1)
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    torch.manual_seed(0)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(out)
    weights = load_file(str(out / "model.safetensors"))
    for name, tensor in load_file(str(text_dir / "model.safetensors")).items():  # the text model's own weights
        weights[name.replace("model.", "model.language_model.", 1)] = tensor
    weights["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in text_dir.iterdir():
        if item.name.startswith("tokenizer") or item.suffix == ".jinja":
            shutil.copyfile(item, out / item.name)
    return out


def test_qwen35_hub_checkpoint_is_trained_and_exported_as_its_text_model(scrambled, tmp_path, tiny_corpus,
                                                                          monkeypatch):
    """The Hub's Qwen3.5 models are vision-language checkpoints: resolving one gives a cached folder
    with the text model alone (same logits), and a run from the checkpoint trains and exports it."""
    from conftest import train_tiny
    from rawtune.export import export_run
    from rawtune.models import resolve_model
    from rawtune.settings import ExportSettings

    monkeypatch.setenv("RAWTUNE_CACHE", str(tmp_path / "cache"))
    text_dir, tokens, want = scrambled("qwen35")
    checkpoint = _vision_language_checkpoint(text_dir, tmp_path / "vl")
    lines = []
    local = Path(resolve_model(str(checkpoint), log=lines.append).local_dir)
    assert local != checkpoint and "multimodal" in lines[0]
    config = json.loads((local / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["tie_word_embeddings"] is True
    assert relative_error(torch_logits(local, tokens), want) < 1e-6
    assert Path(resolve_model(str(checkpoint), log=lines.append).local_dir) == local and len(lines) == 1  # cached

    run = train_tiny(tmp_path / "run", checkpoint, tiny_corpus, max_steps=1, warmup_ratio=0.0, train_embeddings=False,
                     stages=["data", "train"])
    adapter = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert {"in_proj_qkv", "in_proj_z", "out_proj"} <= set(adapter["target_modules"])
    info = export_run(run, ExportSettings(quant=["f16"], name="q"), log=lambda s: None)
    assert info["conversion"]["architecture"] == "qwen35"
    assert info["ppl_f16"] == pytest.approx(info["ppl_merged"], rel=5e-3)


@pytest.mark.parametrize("name,new_kind", [("lfm2", "in_proj"), ("qwen35", "in_proj_qkv")])
def test_lora_on_the_new_layer_kind_learns(name, new_kind, tmp_path, tiny_corpus):
    """Twelve LoRA-only steps on the CPU: the loss falls, held-out perplexity drops, and the adapters
    on the convolution / linear-attention projections were trained (their B matrices left zero)."""
    from safetensors import safe_open

    from conftest import train_tiny

    run = train_tiny(tmp_path / "r", build_family(name, tmp_path / "m"), tiny_corpus, train_embeddings=False,
                     backend="peft")
    losses = [e["loss"] for e in run.load()["train"]["history"] if e["type"] == "step"]
    metrics = run.load()["metrics"]
    print(f"\n[{name}] loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out ppl {metrics['ppl_base']:.1f} -> "
          f"{metrics['ppl_tuned']:.1f}")
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert metrics["ppl_tuned"] < metrics["ppl_base"]
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        trained = [k for k in f.keys() if f".{new_kind}.lora_B" in k and float(f.get_tensor(k).abs().max()) > 0]
    assert trained, f"no {new_kind} adapter was trained"


def test_qwen35_moe_is_refused_before_training(tmp_path, tiny_corpus):
    """A (tiny, real) Qwen3.5 MoE checkpoint stops before any training step, in one line naming the dense sizes."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    from conftest import train_tiny
    from families import build_tokenizer

    path = tmp_path / "moe"
    tok = build_tokenizer("qwen35", path)
    config = Qwen3_5MoeTextConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                  linear_value_head_dim=16, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    torch.manual_seed(0)
    Qwen3_5MoeForCausalLM(config).save_pretrained(path)
    with pytest.raises(TrainError, match="dense Qwen3.5") as info:
        train_tiny(tmp_path / "r", path, tiny_corpus, max_steps=1, backend="peft")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r" / "adapter").exists()
