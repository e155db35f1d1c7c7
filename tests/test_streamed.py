"""The streamed merge against PEFT's merge: every tensor bit for bit, on adapters trained by rawtune.

Each case trains a tiny model for one step through the real pipeline (so LoRA B is non-zero and
embeddings, where trained, have moved), then compares the streamed merge with the merge PEFT
makes on an fp32 model (``merge_and_unload`` + ``untie_if_needed``, what ``merge_run`` saved
before it streamed). Cases cover tied and untied bases, with and without embed_tokens/lm_head
trained, rsLoRA on and off, bf16/fp16/fp32 base files and a sharded base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import train_tiny
from rawtune import streamed
from rawtune.merge import merge_with_peft

from tiny import tiny_model

# (id, tied base, train embeddings, rsLoRA, base dtype, sharded base)
CASES = [
    ("tied-embeddings-rslora", True, True, True, torch.float32, False),
    ("tied-lora-only-bf16", True, False, False, torch.bfloat16, False),
    ("untied-embeddings-fp16-sharded", False, True, False, torch.float16, True),
    ("untied-lora-only-rslora-sharded", False, False, True, torch.float32, True),
]


def _base(root: Path, tokenizer_dir: Path, tied: bool, dtype, sharded: bool) -> Path:
    """A tiny llama saved in ``dtype``, in several shards when asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = tiny_model(root / "fp32", tokenizer_dir, "llama", tie=tied, seed=5)
    model = AutoModelForCausalLM.from_pretrained(fp32, dtype=dtype)
    out = root / "base"
    model.save_pretrained(out, max_shard_size="40KB" if sharded else "50GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file() == sharded
    return out


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory, tiny_tokenizer_dir, tiny_corpus):
    _, tied, embeddings, rslora, dtype, sharded = request.param
    root = tmp_path_factory.mktemp(request.param[0])
    base = _base(root, tiny_tokenizer_dir, tied, dtype, sharded)
    run = train_tiny(root / "run", base, tiny_corpus, max_steps=1, train_embeddings=embeddings,
                     use_rslora=rslora, lora_alpha=12, warmup_ratio=0.0, stages=["data", "train"])
    reference = merge_with_peft((base, run.adapter_dir), root / "peft-merged")
    return dict(run=run, base=base, tied=tied, embeddings=embeddings, rslora=rslora, dtype=dtype,
                reference=reference, root=root)


def _folder_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_streamed_tensors_are_bit_identical_to_peft_merge(case):
    ref = _folder_tensors(case["reference"])
    got = dict(streamed.iter_merged_tensors(case["base"], case["run"].adapter_dir))
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name
    for dtype in (torch.bfloat16, torch.float16):
        rounded = dict(streamed.iter_merged_tensors(case["base"], case["run"].adapter_dir, dtype=dtype))
        assert all(torch.equal(rounded[n], ref[n].to(dtype)) for n in ref)


def test_adapter_really_changed_the_weights(case):
    """Guards the identity test against a no-op adapter (B still zero, embeddings untouched)."""
    base = _folder_tensors(case["base"])
    merged = dict(streamed.iter_merged_tensors(case["base"], case["run"].adapter_dir))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q].float())
    embed = "model.embed_tokens.weight"
    assert torch.equal(merged[embed], base[embed].float()) != case["embeddings"]
    # A tied base keeps one tensor unless an embedding was trained, then both are saved.
    assert ("lm_head.weight" in merged) == (not case["tied"] or case["embeddings"])


def test_merged_folder_matches_peft_folder(case):
    from transformers import AutoModelForCausalLM

    out = case["root"] / "streamed-merged"
    record = streamed.write_merged_folder(case["run"], out, shard_bytes=30_000, log=lambda s: None)
    assert len(record["files"]) > 1 and (out / "model.safetensors.index.json").is_file()
    ref, got = _folder_tensors(case["reference"]), _folder_tensors(out)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert _config(out)["tie_word_embeddings"] == _config(case["reference"])["tie_word_embeddings"]
    assert record["untied_embeddings"] == (case["tied"] and case["embeddings"])
    assert (out / "tokenizer.json").read_bytes() == (case["reference"] / "tokenizer.json").read_bytes()
    ids = torch.arange(1, 30)[None, :]
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(case["reference"], dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_gguf_from_streamed_folder_equals_gguf_from_peft_folder(case, tmp_path):
    """Today's GGUF writer, fed the streamed folder, writes the same tensors as from PEFT's folder."""
    gguf = pytest.importorskip("gguf")
    from rawtune.export import gguf_writer

    if case["dtype"] != torch.float32:
        pytest.skip("the fp32 cases (tied with embeddings, untied LoRA-only) cover the writer")
    out = tmp_path / "streamed"
    streamed.write_merged_folder(case["run"], out, log=lambda s: None)
    files = {}
    for label, folder in (("peft", case["reference"]), ("streamed", out)):
        path = tmp_path / f"{label}.gguf"
        gguf_writer.convert(folder, path, "f16", name="t", log=lambda s: None)
        files[label] = {t.name: t.data.tobytes() for t in gguf.GGUFReader(str(path)).tensors}
    assert files["peft"].keys() == files["streamed"].keys() and len(files["peft"]) > 10
    assert all(files["peft"][n] == files["streamed"][n] for n in files["peft"])


def test_for_gguf_gives_config_tokenizer_and_the_same_arrays(case, tmp_path):
    import numpy as np

    from rawtune.export import gguf_writer

    folder, arrays, info = streamed.for_gguf(case["run"], tmp_path / "skeleton")
    assert not list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    assert _config(folder)["tie_word_embeddings"] == _config(case["reference"])["tie_word_embeddings"]
    assert info["tie_word_embeddings"] == _config(case["reference"])["tie_word_embeddings"]
    want = dict(gguf_writer.iter_hf_tensors(case["reference"]))
    got = dict(arrays)
    assert list(got) == list(want)  # same order too, so a GGUF written from either is the same file
    assert all(got[n].dtype == np.float32 and np.array_equal(got[n], want[n]) for n in want)


def _fresh_copy(case, dst: Path):
    """The case's run without merged/ or earlier GGUFs (the fixture's run is shared by the module)."""
    from rawtune.rundir import RunDir

    return RunDir(shutil.copytree(case["run"].path, dst, ignore=shutil.ignore_patterns("merged", "gguf*")))


def _reference_perplexity(case, run) -> float:
    """The merged folder PEFT wrote, loaded in fp32, on the blocks export scores."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from rawtune.evaluate import perplexity, scoring_blocks

    model = AutoModelForCausalLM.from_pretrained(case["reference"], dtype=torch.float32)
    return perplexity(model, scoring_blocks(np.load(run.data_dir / "heldout.npy")))


def test_export_streams_the_same_gguf_as_the_merged_folder_without_writing_one(case, tmp_path):
    """`rawtune export` merges while writing: the F16 file equals, byte for byte, the writer's file
    from the merged folder; no merged/ appears; the PyTorch check scores exactly the merged model;
    a merged/ written later by `rawtune merge` is kept, and a second export reuses the file until
    the adapter changes."""
    pytest.importorskip("llama_cpp")
    from rawtune.export import export_run, gguf_writer
    from rawtune.merge import merge_run
    from rawtune.settings import ExportSettings

    run = _fresh_copy(case, tmp_path / "run")
    info = export_run(run, ExportSettings(quant=["f16"], name="s"), log=lambda s: None)
    assert info["streamed"] is True and info["reference_dtype"] == "float32"
    assert not run.merged_dir.exists() and not (run.path / "gguf_work").exists()
    got = (run.gguf_dir / "s.F16.gguf").read_bytes()
    license = run.load()["model"].get("license")
    for label, folder in (("peft", case["reference"]), ("merge", merge_run(run, log=lambda s: None))):
        gguf_writer.convert(folder, tmp_path / f"{label}.gguf", "f16", name="s", license=license, log=lambda s: None)
        assert (tmp_path / f"{label}.gguf").read_bytes() == got, label
    assert info["conversion"]["tensors"] > 10
    assert info["ppl_merged"] == round(_reference_perplexity(case, run), 4)

    again = export_run(run, ExportSettings(quant=["f16"], name="s"), log=lambda s: None)
    assert again["reused"] == ["F16"] and run.merged_dir.is_dir()
    weights = run.adapter_dir / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    third = export_run(run, ExportSettings(quant=["f16"], name="s"), log=lambda s: None)
    assert third["reused"] == [] and third["fingerprint"] != again["fingerprint"]
    assert (run.gguf_dir / "s.F16.gguf").read_bytes() == got


def test_large_models_get_a_bf16_reference_model(case, tmp_path, monkeypatch):
    """Above FP32_MAX_PARAMS the one PyTorch model export loads is bf16 (said in the log); its
    perplexity is the merged model's within bf16 rounding, and the GGUF is unchanged."""
    pytest.importorskip("llama_cpp")
    from rawtune.export import export_run, steps
    from rawtune.settings import ExportSettings

    if not (case["tied"] and case["embeddings"]):
        pytest.skip("once is enough")
    run = _fresh_copy(case, tmp_path / "run")
    monkeypatch.setattr(steps, "FP32_MAX_PARAMS", 1000)
    lines: list[str] = []
    info = export_run(run, ExportSettings(quant=["f16"], name="s"), log=lines.append)
    assert info["reference_dtype"] == "bfloat16"
    assert sum("in bfloat16 (above" in line for line in lines) == 1  # loaded once
    want = _reference_perplexity(case, run)
    assert info["ppl_merged"] != round(want, 4) and info["ppl_merged"] == pytest.approx(want, rel=2e-2)
    assert info["ppl_f16"] == pytest.approx(want, rel=5e-3)


def test_merge_run_streams_and_records(case):
    """rawtune merge writes the streamed folder, identical to PEFT's, and records the tie decision."""
    from rawtune.merge import merge_run

    merged = merge_run(case["run"], log=lambda s: None)
    ref, got = _folder_tensors(case["reference"]), _folder_tensors(merged)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    record = case["run"].load()["merge"]
    assert record["untied_embeddings"] == (case["tied"] and case["embeddings"])
    assert record["streamed"] is True


def test_unsupported_or_foreign_adapter_is_refused(case, tiny_tokenizer_dir):
    from rawtune.errors import ExportError

    if case["tied"]:
        pytest.skip("once is enough")
    one_layer = tiny_model(case["root"] / "one-layer", tiny_tokenizer_dir, "llama", tie=False, layers=1)
    with pytest.raises(ExportError, match="another model"):
        next(streamed.iter_merged_tensors(one_layer, case["run"].adapter_dir))
    dora = case["root"] / "dora"
    dora.mkdir(exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / f).write_bytes((case["run"].adapter_dir / f).read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="plain LoRA"):
        next(streamed.iter_merged_tensors(case["base"], dora))
