"""Importance-matrix quantization: llama.cpp's bytes without a matrix, a better file with one.

The models are 384 wide with a 768-wide MLP, so a Q4_K_M file mixes what SmolLM2's does: Q4_K and
Q6_K where the width is a multiple of 256 (ffn_down), and llama.cpp's fallbacks (Q5_0, Q8_0) where
it is not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rawtune.export import gguf_writer
from rawtune.settings import ExportSettings

from conftest import train_tiny
from tiny import tiny_model, write_corpus

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from rawtune.export import export_run, imatrix, steps  # noqa: E402

WIDE = 384  # not a multiple of 256 (fallbacks); the MLP's 768 is (real k-quant blocks)


@pytest.fixture(scope="module")
def wide_f16(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("wide")
    model = tiny_model(root / "model", tiny_tokenizer_dir, "llama", hidden=WIDE, tie=False, seed=3)
    f16 = root / "wide.F16.gguf"
    gguf_writer.convert(model, f16, "f16")
    return f16


def _zero_quantized(src: Path, dst: Path) -> int:
    """Copy ``src`` with the bytes of every quantized tensor set to zero; returns how many."""
    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    count = 0
    with open(dst, "r+b") as handle:
        for tensor in GGUFReader(str(src)).tensors:
            if tensor.tensor_type.name not in imatrix.FLOAT_TYPES:
                handle.seek(int(tensor.data_offset))
                handle.write(b"\0" * int(tensor.n_bytes))
                count += 1
    return count


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "IQ4_XS", "IQ4_NL"])
def test_ggml_dequantize_matches_gguf_py(name):
    """The compensated rounding reads its rounding error back through ggml's own dequantize: the
    values equal gguf-py's reference dequantization of the same bytes for every type export writes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    lib = imatrix._ggml()
    ggml_type = int(GGMLQuantizationType[name])
    values = np.random.default_rng(5).standard_normal((6, 512)).astype(np.float32)
    blob = np.frombuffer(imatrix.quantize_tensor(lib, values, ggml_type, np.ones(512, np.float32)), dtype=np.uint8)
    ours = imatrix.dequantize_blocks(lib, blob.reshape(6, -1), ggml_type, (6, 512))
    reference = dequantize(blob.reshape(6, -1), GGMLQuantizationType[name]).reshape(6, 512)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    assert np.abs(ours - values).mean() < 0.1  # and it is the data back, to the type's precision


def test_tensor_index_matches_gguf_readers_table(wide_f16, tmp_path):
    """rawtune's fast tensor table (export reads every quantized file's several times) gives what
    gguf-py's reader gives: names, types, shapes, offsets, byte counts and the float values; a file
    cut inside its tensor records or its data is refused as truncated."""
    from gguf import GGUFReader

    from rawtune.export.gguf_index import read_index

    quantized = tmp_path / "q.gguf"
    steps.quantize(wide_f16, quantized, "Q4_K_M", tmp_path / "export.log")
    for path in (wide_f16, quantized):
        ours, theirs = read_index(path), GGUFReader(str(path)).tensors
        assert [(t.name, t.ggml_type, t.shape, t.data_offset, t.n_bytes) for t in ours] == [
            (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in theirs]
    by_name = {t.name: t for t in GGUFReader(str(wide_f16)).tensors}
    for entry in read_index(wide_f16):
        expected = np.asarray(by_name[entry.name].data).astype(np.float32).reshape(-1, entry.shape[0])
        assert np.array_equal(entry.values(wide_f16), expected)
    data = quantized.read_bytes()
    last = read_index(quantized)[-1]
    for cut in (200, last.data_offset + last.n_bytes - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_index(tmp_path / "cut.gguf")


# The GGML types llama.cpp mixes into each file of the wide model: the type's own blocks where the
# width is a multiple of 256, its 32-wide fallback where it is not.
MIXES = {"Q4_K_M": {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, "Q5_K_M": {"Q5_K", "Q6_K", "Q5_1", "Q8_0"},
         "Q6_K": {"Q6_K", "Q8_0"}, "IQ4_XS": {"IQ4_XS", "IQ4_NL"}, "Q8_0": {"Q8_0"}}


@pytest.mark.parametrize("label", ["IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
def test_per_tensor_path_without_imatrix_is_llama_cpp_bit_for_bit(label, wide_f16, tmp_path):
    reference = tmp_path / f"ref.{label}.gguf"
    steps.quantize(wide_f16, reference, label, tmp_path / "export.log")
    types = steps.tensor_types(reference)
    assert MIXES[label] <= set(types), types  # the mix, fallbacks included
    mine = tmp_path / "mine.gguf"
    zeroed = _zero_quantized(reference, mine)
    assert zeroed == sum(n for t, n in types.items() if t != "F32") and mine.read_bytes() != reference.read_bytes()
    rewritten = imatrix.requantize(wide_f16, mine, None, threads=2, only_weighted=False)
    assert rewritten == (zeroed, 0)  # (tensors written, compensated): no H matrices here
    assert mine.read_bytes() == reference.read_bytes()  # every tensor's bytes, and everything else


def test_imatrix_entries_match_tensors_and_change_only_k_quant_bytes(wide_f16, tmp_path):
    """Matrix entries carry the GGUF names and input widths; weighting changes the Q4_K_M bytes."""
    from gguf import GGUFReader

    reference = tmp_path / "ref.gguf"
    steps.quantize(wide_f16, reference, "Q4_K_M", tmp_path / "export.log")
    shapes = {t.name: int(t.shape[0]) for t in GGUFReader(str(wide_f16)).tensors}
    rng = np.random.default_rng(0)
    values = {name: rng.lognormal(0.0, 1.0, cols).astype(np.float32)
              for name, cols in shapes.items() if name.startswith("blk.") and not name.endswith("norm.weight")}
    matrix = imatrix.Imatrix(values, blocks=1, tokens=1, source="random")
    weighted = tmp_path / "weighted.gguf"
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(reference)).tensors}
    rewritten = [n for n in values if kinds[n] != "Q8_0"]  # Q8_0 ignores an importance without H
    assert 0 < len(rewritten) < len(values)  # the wide model's Q6_K fallbacks are Q8_0
    assert imatrix.quantize_file(wide_f16, reference, weighted, matrix) == (len(rewritten), 0)
    after = {t.name: bytes(t.data) for t in GGUFReader(str(weighted)).tensors}
    before = {t.name: bytes(t.data) for t in GGUFReader(str(reference)).tensors}
    changed = {name for name in before if after[name] != before[name]}
    assert changed and changed <= set(values)  # token_embd, output and norms are untouched
    assert steps.tensor_types(weighted) == steps.tensor_types(reference)  # llama.cpp's types kept


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "Q6_K", "Q5_K", "Q5_1", "IQ4_XS", "IQ4_NL", "Q8_0"])
def test_error_compensation_lowers_the_layer_output_error(type_name):
    """On inputs like a layer's (a few strong directions plus noise, unevenly scaled columns), moving
    each group's rounding error onto the later columns gives a smaller error in the layer's output
    than weighted rounding alone, in the same number of bytes of the same type (measured: 0.45 x
    Q4_K, 0.22 x Q5_0, 0.40 x Q6_K)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    lib = imatrix._ggml()
    rng = np.random.default_rng(0)
    rows, cols, tokens = 48, 1024, 4096
    strong = rng.normal(size=(tokens, 64)) @ rng.normal(size=(64, cols))
    x = (strong + 0.3 * rng.normal(size=(tokens, cols))) * rng.lognormal(0.0, 1.0, cols)
    h = x.T @ x / tokens
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]

    def output_error(blob: bytes) -> float:
        q = dequantize(np.frombuffer(blob, dtype=np.uint8).reshape(rows, -1), qtype).reshape(rows, cols)
        return float(np.linalg.norm((w - q) @ x.T))

    rounded = imatrix.quantize_tensor(lib, w, int(qtype), np.diag(h).astype(np.float32))
    compensated = imatrix.compensated(lib, w, int(qtype), h)
    assert len(compensated) == len(rounded)
    assert output_error(compensated) < 0.7 * output_error(rounded), (output_error(compensated), output_error(rounded))


def _compensation_case(rows: int = 48, cols: int = 1024, tokens: int = 4096):
    rng = np.random.default_rng(0)
    strong = rng.normal(size=(tokens, 64)) @ rng.normal(size=(64, cols))
    x = (strong + 0.3 * rng.normal(size=(tokens, cols))) * rng.lognormal(0.0, 1.0, cols)
    return x, x.T @ x / tokens, rng.normal(size=(rows, cols)).astype(np.float32)


def _output_error(blob: bytes, w: np.ndarray, x: np.ndarray, qtype) -> float:
    from gguf.quants import dequantize

    q = dequantize(np.frombuffer(blob, dtype=np.uint8).reshape(w.shape[0], -1), qtype).reshape(w.shape)
    return float(np.linalg.norm((w - q) @ x.T))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0"])
def test_compensation_in_torch_matches_numpy(type_name):
    """The torch route of the compensation (export's on a GPU; here on the CPU) gives the numpy
    route's bytes up to a few blocks where float64 rounding tips a scale, and the same output error."""
    from gguf import GGMLQuantizationType

    lib = imatrix._ggml()
    x, h, w = _compensation_case()
    qtype = GGMLQuantizationType[type_name]
    by_numpy = imatrix.compensated(lib, w, int(qtype), h)
    by_torch = imatrix.compensated(lib, w, int(qtype), h, device="cpu")
    assert len(by_torch) == len(by_numpy)
    differ = np.mean(np.frombuffer(by_torch, np.uint8) != np.frombuffer(by_numpy, np.uint8))
    assert differ < 0.01, differ
    a, b = _output_error(by_numpy, w, x, qtype), _output_error(by_torch, w, x, qtype)
    assert abs(a - b) < 0.01 * a, (a, b)


@pytest.mark.gpu
def test_compensation_on_the_gpu_matches_numpy():
    """On the card the compensation keeps the CPU route's output error (within 1 %)."""
    import torch
    from gguf import GGMLQuantizationType

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lib = imatrix._ggml()
    x, h, w = _compensation_case()
    qtype = GGMLQuantizationType.Q4_K
    by_numpy = imatrix.compensated(lib, w, int(qtype), h)
    by_gpu = imatrix.compensated(lib, w, int(qtype), h, device="cuda")
    assert len(by_gpu) == len(by_numpy)
    a, b = _output_error(by_numpy, w, x, qtype), _output_error(by_gpu, w, x, qtype)
    assert abs(a - b) < 0.01 * a, (a, b)


def test_hessians_agree_with_the_importances_and_keep_to_the_budget(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """H's diagonal is the importance (both Σ w x² / Σ w); H is symmetric and positive semi-definite.
    The whole-model pass keeps to its byte budget and records no H on a 16-bit model; the
    layer-by-layer pass export uses records H on a bf16 model too, close to the fp32 one."""
    import torch

    from rawtune.export.imatrix import _gguf_names, collect
    from rawtune.models import load_causal_lm

    model_dir = tiny_model(tmp_path / "m", tiny_tokenizer_dir, "llama", hidden=64)
    blocks = np.random.default_rng(1).integers(3, 200, size=(3, 32))
    full = imatrix.compute(model_dir, blocks, "random")
    assert full.hessians and set(full.hessians) == set(full.values)
    for name, h in full.hessians.items():
        np.testing.assert_allclose(np.diag(h), full.values[name], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(h, h.T, rtol=1e-4, atol=1e-6 * np.abs(h).max())
        assert np.linalg.eigvalsh(h.astype(np.float64)).min() > -1e-5 * np.abs(h).max()
    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    names = _gguf_names(model, gguf_writer.read_json(model_dir / "config.json"))
    monkeypatch.setattr(imatrix, "HESSIAN_BUDGET_BYTES", 3 * 64 * 64 * 4)
    values, capped = collect(model, names, blocks)
    assert len(capped) == 3 and set(values) == set(full.values)
    bf16_model = load_causal_lm(model_dir, device="cpu", dtype=torch.bfloat16)
    values, old_bf16 = collect(bf16_model, names, blocks)
    assert not old_bf16 and set(values) == set(full.values)
    bf16 = imatrix.compute(model_dir, blocks, "random", model=bf16_model)
    assert set(bf16.hessians) == set(full.hessians)
    for name, h in bf16.hessians.items():
        ref = full.hessians[name]
        assert np.abs(h - ref).max() < 0.1 * np.abs(ref).max(), name


@pytest.mark.parametrize("arch,batch_size", [("llama", 1), ("qwen2", 2)])
def test_layer_by_layer_pass_is_bit_identical_to_the_whole_model_pass(arch, batch_size, tmp_path,
                                                                      tiny_tokenizer_dir):
    """Importances and H from one layer at a time (export's pass) equal the whole-model pass's bit
    for bit on the CPU (qwen2: biases; batch 2 over 5 blocks: a short last batch), and so do the
    compensated Q4_K bytes made from them."""
    import torch

    from rawtune.export.imatrix import _gguf_names, collect
    from rawtune.export.layerwise import collect_layerwise
    from rawtune.models import load_causal_lm

    model_dir = tiny_model(tmp_path / "m", tiny_tokenizer_dir, arch, hidden=256, layers=3, seed=5)
    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32).eval()
    names = _gguf_names(model, gguf_writer.read_json(model_dir / "config.json"))
    blocks = np.random.default_rng(2).integers(3, 200, size=(5, 48))
    old_values, old_h = collect(model, names, blocks, batch_size)
    new_values, new_h = collect_layerwise(model, names, blocks, "cpu", batch_size)
    assert set(new_values) == set(old_values) == set(names.values())
    assert set(new_h) == set(old_h) and len(old_h) == len(names)
    for key in old_values:
        assert np.array_equal(new_values[key], old_values[key]), key
        assert np.array_equal(new_h[key], old_h[key]), key
    assert all(p.device.type == "cpu" for p in model.parameters())
    lib = imatrix._ggml()
    from gguf import GGMLQuantizationType

    key = next(k for k in old_h if k.endswith("attn_q.weight"))
    w = model.get_submodule(next(n for n, k in names.items() if k == key)).weight.detach().numpy()
    q4k = int(GGMLQuantizationType.Q4_K)
    assert imatrix.compensated(lib, w, q4k, new_h[key]) == imatrix.compensated(lib, w, q4k, old_h[key])


def test_layer_by_layer_pass_spills_hessians_past_the_ram_budget(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Past the RAM budget H matrices go to files in the spill folder, read back memory-mapped, same values."""
    from rawtune.export import layerwise

    model_dir = tiny_model(tmp_path / "m", tiny_tokenizer_dir, "llama", hidden=64)
    blocks = np.random.default_rng(1).integers(3, 200, size=(2, 32))
    in_ram = imatrix.compute(model_dir, blocks, "random")
    monkeypatch.setattr(layerwise, "RAM_BUDGET_BYTES", 2 * 64 * 64 * 4)
    spilled = imatrix.compute(model_dir, blocks, "random", spill_dir=tmp_path / "spill")
    on_disk = [k for k, h in spilled.hessians.items() if isinstance(h, np.memmap)]
    assert len(on_disk) == len(in_ram.hessians) - 2 and len(list((tmp_path / "spill").iterdir())) == len(on_disk)
    for key, h in spilled.hessians.items():
        assert np.array_equal(np.asarray(h), in_ram.hessians[key]), key


@pytest.mark.gpu
def test_layer_by_layer_pass_on_the_gpu_matches_the_cpu(tmp_path, tiny_tokenizer_dir):
    """On the card the same pass gives the CPU's importances and H within float32 rounding, and
    leaves the model on the CPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model_dir = tiny_model(tmp_path / "m", tiny_tokenizer_dir, "llama", hidden=256, layers=3)
    blocks = np.random.default_rng(1).integers(3, 200, size=(4, 64))
    from rawtune.models import load_causal_lm

    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    cpu = imatrix.compute(model_dir, blocks, "random", model=model)
    gpu = imatrix.compute(model_dir, blocks, "random", model=model, device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert set(gpu.hessians) == set(cpu.hessians) and set(gpu.values) == set(cpu.values)
    for key, h in cpu.hessians.items():
        np.testing.assert_allclose(gpu.hessians[key], h, rtol=2e-3, atol=2e-3 * np.abs(h).max())
        np.testing.assert_allclose(gpu.values[key], cpu.values[key], rtol=2e-3, atol=1e-6 * cpu.values[key].max())


@pytest.fixture(scope="module")
def wide_trained_run(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny 384-wide model trained for 40 steps (far enough that its weights carry structure)."""
    root = tmp_path_factory.mktemp("wide_run")
    model = tiny_model(root / "model", tiny_tokenizer_dir, "llama", hidden=WIDE)
    corpus = write_corpus(root / "corpus.jsonl", documents=200)
    return train_tiny(root / "run", model, corpus, max_steps=40)


def test_imatrix_lowers_heldout_perplexity_of_q4_k_m(wide_trained_run):
    run = wide_trained_run
    lines: list[str] = []
    plain = export_run(run, ExportSettings(quant=["q4_k_m"], imatrix_blocks=0), log=lines.append)
    ppl_plain = run.load()["gguf"]["Q4_K_M"]["ppl"]
    assert plain["imatrix"] is None and run.load()["gguf"]["Q4_K_M"]["imatrix_tokens"] == 0
    weighted = export_run(run, ExportSettings(quant=["q4_k_m"], imatrix_blocks=32), log=lines.append)
    entry = run.load()["gguf"]["Q4_K_M"]
    train_blocks = np.load(run.data_dir / "train.npy")
    used = min(32, len(train_blocks))
    assert weighted["imatrix"]["blocks"] == used and weighted["imatrix"]["tokens"] == used * train_blocks.shape[1]
    assert entry["imatrix_tokens"] == weighted["imatrix"]["tokens"] and "train.npy" in weighted["imatrix"]["source"]
    assert weighted["ppl_merged"] == plain["ppl_merged"] and weighted["ppl_blocks"] == plain["ppl_blocks"]
    assert weighted["imatrix"]["hessians"] == weighted["imatrix"]["entries"]  # every weight fits the budget
    assert entry["imatrix_check"]["kept"] == "importance matrix" and entry["compensated_tensors"] > 0
    # Both numbers are real llama.cpp perplexities of two files on the same held-out tokens.
    assert entry["ppl"] < ppl_plain, (entry["ppl"], ppl_plain, plain["ppl_merged"])
    assert entry["ppl"] > plain["ppl_merged"] * 0.99  # still a 4-bit file, not a copy of the merged model


def test_check_keeps_llama_cpp_file_when_the_matrix_scores_worse(wide_trained_run, tmp_path):
    """A matrix that only cares for every 7th column rounds the other columns badly: scored on other
    training blocks it loses to llama.cpp's plain file, which export then keeps byte for byte."""
    from gguf import GGUFReader

    run = wide_trained_run
    export_run(run, ExportSettings(quant=["f16", "q4_k_m"], imatrix_blocks=0, name="chk"), log=lambda s: None)
    f16, plain = run.gguf_dir / "chk.F16.gguf", run.gguf_dir / "chk.Q4_K_M.gguf"
    values = {}
    for t in GGUFReader(str(f16)).tensors:
        if t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
            cols = np.full(int(t.shape[0]), 1e-6, dtype=np.float32)
            cols[::7] = 1e6
            values[t.name] = cols
    weighted = tmp_path / "weighted.gguf"
    imatrix.quantize_file(f16, plain, weighted, imatrix.Imatrix(values, blocks=1, tokens=1, source="skewed"))
    keep = tmp_path / "plain.gguf"
    shutil.copyfile(plain, keep)
    calibration, rest = imatrix.pick_blocks(np.load(run.data_dir / "train.npy"), 16, with_rest=True)
    assert len(rest) and not set(map(bytes, rest)) & set(map(bytes, calibration))
    check = steps.keep_better(keep, weighted, imatrix.pick_blocks(rest, steps.CHECK_BLOCKS))
    assert check["kept"] == "plain" and check["ppl_weighted"] > check["ppl_plain"] and check["blocks"] > 0
    assert weighted.read_bytes() == plain.read_bytes()


def test_fallback_warnings_become_one_summary_line(wide_trained_run, capfd):
    run = wide_trained_run
    log_file = run.path / steps.LOG_FILE
    log_file.unlink(missing_ok=True)
    lines: list[str] = []
    export_run(run, ExportSettings(quant=["q4_k_m", "q8_0"], imatrix_blocks=0, name="quiet"),
                      log=lines.append)
    printed = capfd.readouterr()
    console = "\n".join(lines) + printed.out + printed.err
    assert "falling back" not in console and "ncols" not in console  # llama.cpp's per-tensor lines
    full = log_file.read_text()
    warned = full.count("-> falling back to")
    q5 = full.count("(required for type    q4_K) -> falling back to    q5_0")
    assert warned > 0 and q5 > 0
    summaries = [line for line in lines if "fell back" in line]
    assert len(summaries) == 1, summaries  # Q8_0 has no fallbacks: no line for it
    quantized = sum(n for t, n in run.load()["gguf"]["Q4_K_M"]["tensor_types"].items() if t != "F32")
    assert f"{q5} of {quantized} tensors fell back from Q4_K to Q5_0" in summaries[0]
    assert f"width {WIDE} is not a multiple of 256" in summaries[0]
    assert run.load()["gguf"]["Q4_K_M"]["fallback"] in summaries[0]


def test_fallback_summary_text():
    text = ("warning: blk.0.attn_q.weight                 - ncols    576 not divisible by 256 (required for type    q4_K) "
            "-> falling back to    q5_0\n" * 3
            + "warning: output.weight - ncols    576 not divisible by 256 (required for type    q6_K) "
              "-> falling back to    q8_0\n")
    assert steps.fallback_summary(text, 10) == ("3 of 10 tensors fell back from Q4_K to Q5_0; 1 from Q6_K to Q8_0: "
                                                 "width 576 is not a multiple of 256")
    assert steps.fallback_summary("llama_model_quantize_impl: model size = 1 MiB\n", 10) is None


def test_card_and_record_say_where_the_calibration_tokens_came_from(wide_trained_run):
    from rawtune.publish.card import render

    run = wide_trained_run
    export_run(run, ExportSettings(quant=["q4_k_m", "q8_0"], imatrix_blocks=8, name="card"), log=lambda s: None)
    record = run.load()
    seq_len = np.load(run.data_dir / "train.npy").shape[1]
    assert record["export"]["imatrix"]["tokens"] == 8 * seq_len and record["export"]["imatrix"]["blocks"] == 8
    assert record["gguf"]["Q4_K_M"]["imatrix_tokens"] == 8 * seq_len
    card = render(record, "alice/card", [record["gguf"][q]["file"] for q in ("Q4_K_M", "Q8_0")])
    # Q8_0 gets error compensation only, kept where it scores better than llama.cpp's file.
    q8 = record["gguf"]["Q8_0"]
    if q8["imatrix_check"]["kept"] == "importance matrix":
        assert q8["imatrix_tokens"] == 8 * seq_len and q8["compensated_tensors"] > 0
        assert f"Q4_K_M, Q8_0 were quantized with an importance matrix computed from {8 * seq_len:,} tokens" in card
    else:
        assert q8["imatrix_tokens"] == 0 and "Q8_0 is llama.cpp's plain quantization" in card
        assert f"Q4_K_M was quantized with an importance matrix computed from {8 * seq_len:,} tokens" in card
    assert record["gguf"]["Q4_K_M"]["compensated_tensors"] > 0 and "each group's error compensated" in card
    blocks = record["export"]["ppl_blocks"]
    assert f"never trained on ({blocks[0] * blocks[1]:,} tokens)" in card


def test_new_quant_types_load_and_score_within_their_bands(wide_trained_run):
    """IQ4_XS, Q5_K_M and Q6_K: written with the importance matrix (or llama.cpp's plain file where
    that scored better), loaded by llama.cpp, their tokenization the HF tokenizer's, their
    perplexity within the table's bound and their KL divergence in the order of their bits."""
    from rawtune import quants

    run = wide_trained_run
    lines: list[str] = []
    info = export_run(run, ExportSettings(quant=["iq4_xs", "q5_k_m", "q6_k", "q8_0"], imatrix_blocks=16, name="new"),
                      log=lines.append)
    gguf = run.load()["gguf"]
    assert info["warnings"] == [] and sorted(p.name for p in run.gguf_dir.glob("new.*.gguf")) == [
        "new.IQ4_XS.gguf", "new.Q5_K_M.gguf", "new.Q6_K.gguf", "new.Q8_0.gguf"]
    for label in ("IQ4_XS", "Q5_K_M", "Q6_K"):
        entry = gguf[label]
        assert entry["tokenizer_ok"] and isinstance(entry["sample"], str)
        assert MIXES[label] <= set(entry["tensor_types"]), entry["tensor_types"]
        assert -1.0 < entry["ppl_increase_pct"] < quants.get(label).bound_pct, (label, entry["ppl_increase_pct"])
        check = entry["imatrix_check"]
        assert check["blocks"] > 0 and check["kept"] in ("importance matrix", "plain")
        assert (entry["imatrix_tokens"] > 0) == (check["kept"] == "importance matrix")
    kld = {label: gguf[label]["kld_mean"] for label in gguf}
    assert kld["IQ4_XS"] > kld["Q5_K_M"] > kld["Q8_0"] and kld["Q6_K"] > kld["Q8_0"], kld
    assert (run.gguf_dir / "Modelfile").read_text().startswith("FROM ./new.IQ4_XS.gguf\n")  # the smallest


def test_iq4_xs_is_refused_without_an_importance_matrix(wide_trained_run):
    from rawtune.errors import ConfigError, ExportError
    from rawtune.settings import RunSettings, validate

    with pytest.raises(ExportError, match="IQ4_XS is only made with an importance matrix"):
        export_run(wide_trained_run, ExportSettings(quant=["iq4_xs"], imatrix_blocks=0, name="refused"),
                   log=lambda s: None)
    assert not list(wide_trained_run.gguf_dir.glob("refused.*"))
    settings = RunSettings()
    settings.export.quant, settings.export.imatrix_blocks = ["q4_k_m", "iq4_xs"], 0
    with pytest.raises(ConfigError, match="--imatrix-blocks.*IQ4_XS is only made with an importance matrix"):
        validate(settings)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3", "qwen3", "smollm3", "granite", "olmo2", "mistral"])
def test_layer_by_layer_pass_is_bit_identical_in_every_family(family, tmp_path):
    """Each family's own preprocessing (Gemma's scaled embeddings and sliding windows, Phi-3's fused
    projections, SmolLM3's layers without RoPE, Granite's multipliers) reaches the layer-by-layer
    pass through the recorded calls: the same importances and H bit for bit as the whole model's."""
    import torch

    from families import build_family
    from rawtune.export.imatrix import _gguf_names, collect
    from rawtune.export.layerwise import collect_layerwise
    from rawtune.models import load_causal_lm

    model_dir = build_family(family, tmp_path / "m")
    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32).eval()
    names = _gguf_names(model, gguf_writer.read_json(model_dir / "config.json"))
    blocks = np.random.default_rng(4).integers(3, 120, size=(3, 40))
    old_values, old_h = collect(model, names, blocks)
    new_values, new_h = collect_layerwise(model, names, blocks, "cpu")
    assert set(new_values) == set(old_values) and set(new_h) == set(old_h) and old_h
    for key in old_values:
        assert np.array_equal(new_values[key], old_values[key]), key
    for key in old_h:
        assert np.array_equal(new_h[key], old_h[key]), key


def test_q8_0_is_rewritten_only_where_an_h_matrix_compensates(wide_f16, tmp_path):
    """Q8_0's rounding ignores the importance: a matrix without H leaves llama.cpp's Q8_0 file as it
    is (nothing rewritten), one with H rewrites and compensates every tensor that has it."""
    from gguf import GGUFReader

    plain = tmp_path / "plain.Q8_0.gguf"
    steps.quantize(wide_f16, plain, "Q8_0", tmp_path / "export.log")
    tensors = {t.name: t for t in GGUFReader(str(wide_f16)).tensors if t.name.endswith("attn_q.weight")}
    rng = np.random.default_rng(1)
    values = {name: rng.uniform(0.5, 2.0, int(t.shape[0])).astype(np.float32) for name, t in tensors.items()}
    importance_only = imatrix.Imatrix(values, 4, 256, "test")
    assert imatrix.quantize_file(wide_f16, plain, tmp_path / "same.gguf", importance_only) == (0, 0)
    assert (tmp_path / "same.gguf").read_bytes() == plain.read_bytes()
    hessians = {}
    for name, t in tensors.items():
        x = rng.normal(size=(512, int(t.shape[0]))) * values[name]
        hessians[name] = (x.T @ x / 512).astype(np.float32)
    with_h = imatrix.Imatrix(values, 4, 256, "test", hessians=hessians)
    assert imatrix.quantize_file(wide_f16, plain, tmp_path / "comp.gguf", with_h) == (len(tensors), len(tensors))
    assert (tmp_path / "comp.gguf").read_bytes() != plain.read_bytes()
    assert steps.tensor_types(tmp_path / "comp.gguf") == steps.tensor_types(plain)


def test_check_compares_kl_divergence_to_the_merged_model(wide_trained_run):
    """The keep-or-plain check scores both files of a type against the merged model's own
    log-probabilities on the check blocks and keeps the one with the lower mean KL divergence."""
    run = wide_trained_run
    lines: list[str] = []
    export_run(run, ExportSettings(quant=["q4_k_m", "q8_0"], imatrix_blocks=16, name="kldchk"), log=lines.append)
    gguf = run.load()["gguf"]
    for label in ("Q4_K_M", "Q8_0"):
        check = gguf[label]["imatrix_check"]
        assert check["blocks"] > 0 and check["kld_plain"] > 0 and check["kld_weighted"] > 0, (label, check)
        assert (check["kept"] == "importance matrix") == (check["kld_weighted"] < check["kld_plain"]), check
    assert sum("for the keep-or-plain check" in line for line in lines) == 1
    assert sum("KL divergence to the merged model" in line for line in lines) == 2
    assert not list(run.path.rglob("*check-logprobs*"))  # the stored log-probabilities are gone
