"""The family registry (rawtune/families/): discovery, lookups, LoRA target mapping and the README tables.

The registry is the one place a family is declared; these tests check what every other module
relies on: that a module with FAMILY is found without editing a list (a copy of the package with
one more module), that lookups by HF architecture, model type and Hub id agree, that the LoRA
mapping turns the settings' generic names into a family's own modules, and that the README's
tables are the generated ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rawtune import families
from rawtune.families import readme
from rawtune.families.base import Family, Lora

ROOT = Path(__file__).resolve().parents[1]


def test_ten_families_and_their_lookups():
    names = [f.name for f in families.all_families()]
    ten = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3", "granite", "olmo2"]
    assert [n for n in names if n in ten] == ten  # in this order, with the newer families among them
    assert families.family_for_arch("Phi3ForCausalLM").name == "phi3"
    assert families.family_for_arch("NotAModelForCausalLM") is None
    assert families.family_for_config({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}).name == "gemma3"
    assert families.family_for_config({"model_type": "olmo2"}).name == "olmo2"  # no architectures: by model type
    assert families.family_for_config({"architectures": ["BertModel"], "model_type": "llama"}) is None
    entry = families.known_model("qwen/qwen3-0.6b")
    assert entry.family == "qwen3" and entry.params == 0.6e9 and entry.instruct
    # Planner-only entries are known but not listed in the app.
    assert families.known_model("meta-llama/Llama-3.1-8B").listed is False
    assert "meta-llama/Llama-3.1-8B" not in [m.repo for m in families.known_models()]
    shape = families.planner_shape("meta-llama/Llama-3.2-3B-Instruct")
    assert shape["model_type"] == "llama" and shape["hidden_size"] == 3072 and shape["vocab_size"] == 128256
    assert families.planner_shape("someone/unknown-7b") == {}
    assert set(families.end_of_turn_tokens()) >= {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"}


def test_lora_targets_by_layer_kind():
    split = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    phi3 = families.family_named("phi3")
    assert families.lora_targets(phi3, split, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}) == \
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    llama = families.family_named("llama")
    assert families.lora_targets(llama, split, set(split)) == split
    assert families.lora_targets(None, ["q_proj"], {"qkv_proj"}) == ["q_proj"]  # unknown family: unchanged
    # A family that names its layers differently, with a convolution kind its standard preset adds.
    conv = Family("conv", "Conv", ("ConvForCausalLM",), ("conv",), lora=Lora(
        kinds={"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("w1", "w2", "w3"),
               "conv": ("in_proj",)}, presets={"standard": ("conv",)}))
    names = {"q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2", "w3", "in_proj", "conv"}
    assert families.lora_targets(conv, split, names, "quick") == ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                  "w1", "w2", "w3"]
    assert families.lora_targets(conv, split, names, "standard")[-1] == "in_proj"
    assert families.lora_targets(conv, ["q_proj"], names, "quick") == ["q_proj"]  # a name the model has stays
    experts = Family("moe", "MoE", ("MoeForCausalLM",), ("moe",), lora=Lora(
        parameters={"*": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), "quick": ()}))
    assert families.lora_parameters(experts, "standard") == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert families.lora_parameters(experts, "quick") == []
    assert families.lora_parameters(llama, "standard") == [] and families.lora_parameters(None) == []


def test_readme_tables_are_generated():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.rewrite(text) == text, "README tables differ: run python -m rawtune.families --readme"
    for family in families.all_families():
        assert f"`{family.hf_architectures[0]}`" in text
    assert "`google/gemma-3-1b-it` | gemma3 | 1.00B | instruct | yes |" in text


def test_readme_check_fails_on_a_changed_table(tmp_path):
    """Negative control: a README whose table lost a row is found different, and --readme mends it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    changed = "\n".join(line for line in text.splitlines() if "`Olmo2ForCausalLM`" not in line) + "\n"
    path = tmp_path / "README.md"
    path.write_text(changed, encoding="utf-8")
    from rawtune.families.__main__ import main

    assert main(["--check", "--path", str(path)]) == 1
    assert main(["--readme", "--path", str(path)]) == 0
    assert main(["--check", "--path", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == readme.rewrite(changed)
    with pytest.raises(ValueError, match="markers"):
        readme.rewrite("no markers here")


def test_a_new_family_module_is_found(tmp_path):
    """Adding a family is adding a module: a copy of the package with one more module lists it, with its
    models, and export names it among the supported architectures."""
    shutil.copytree(ROOT / "rawtune", tmp_path / "rawtune", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "rawtune" / "families" / "newfam.py").write_text(
        '"""A test family."""\n\nfrom .base import Family, Gguf, KnownModel\n\n'
        'FAMILY = Family(name="newfam", label="New", hf_architectures=("NewForCausalLM",), model_types=("newfam",),\n'
        '                order=5, gguf=Gguf("LLAMA"), models=(KnownModel("someone/new-1b", 1e9),))\n', encoding="utf-8")
    code = ("import json; from rawtune import families as f; "
            "print(json.dumps([[x.name for x in f.all_families()], f.known_model('someone/new-1b').family, "
            "'NewForCausalLM' in f.supported_text()]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    names, family, supported = json.loads(out.stdout.strip().splitlines()[-1])
    assert names[0] == "newfam" and "llama" in names and family == "newfam" and supported
