"""Q4_K_M with several importance statistics on one finished run: which file loses least.

For a run directory that has ``merged/`` (``rawtune merge RUN`` writes it) and an export record,
this writes the F16 GGUF and llama.cpp's default Q4_K_M into ``--work``, computes from the same 16
training blocks export uses (``imatrix.pick_blocks``) two statistics per weight column, llama.cpp's
plain mean of x² and rawtune's gradient-weighted mean of x² (``imatrix.compute``), raises each to
the powers asked, re-quantizes Q4_K_M with each (``imatrix.quantize_file``; the variant
``compensated`` is what export does: the gradient-weighted statistic with its H matrices, each
group's rounding error moved onto the later columns, ``imatrix.compensated``), and scores every file
with llama.cpp on the run's held-out blocks (the tokens export reports) and on export's 8 check
blocks (training blocks outside the calibration set). It prints one markdown table:

    variant | held-out perplexity | increase over the merged model | / llama.cpp default's | check blocks

Usage (CPU; about a minute per variant at 135M on 2 cores)::

    python bench/imatrix_variants.py RUN --work imx-variants --variants plain:1,grad:1,compensated

``--per-block`` also prints, for each variant, the mean and standard error over held-out blocks
of the per-token loss difference to the default file (is a difference more than noise?).

``--tiny`` (no RUN) first makes a run directory in ``--work`` around a random two-layer model of
hidden size 256 (real k-quant blocks) with the test tokenizer, 64-token blocks and the merged
model's perplexity from PyTorch, then runs the same variants on it: a smoke test of the code on a
CPU, not a measurement::

    python bench/imatrix_variants.py --tiny --work /tmp/imx-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_statistic(model_dir: Path, blocks: np.ndarray) -> dict:
    """llama.cpp's statistic: the mean of x² per input column, forward passes only."""
    import torch

    from rawtune.models import load_causal_lm

    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32).eval()
    return plain_statistic_of(model, model_dir, blocks)


def plain_statistic_of(model, model_dir: Path, blocks: np.ndarray) -> dict:
    """:func:`plain_statistic` of a model already loaded (``model_dir`` gives its config.json);
    float64 sums, returned as float64 arrays keyed by GGUF tensor name."""
    import torch

    from rawtune.export import imatrix
    from rawtune.export.gguf_writer import read_json

    names = imatrix._gguf_names(model, read_json(model_dir / "config.json"))
    modules, sums = dict(model.named_modules()), {}

    def hook(key):
        def forward(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.square().sum(0)
        return forward

    handles = [modules[m].register_forward_hook(hook(k)) for m, k in names.items()]
    with torch.no_grad():
        for block in blocks:
            model(input_ids=torch.as_tensor(block[None]))
    for handle in handles:
        handle.remove()
    return {k: (v / blocks.size).numpy() for k, v in sums.items()}


def tiny_run(work: Path) -> Path:
    """A finished-looking run directory for --tiny: ``merged/`` (random weights), data blocks of the
    test corpus, and ``run.json`` with the merged model's held-out perplexity."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import sentences, tiny_model, tiny_tokenizer
    from transformers import AutoTokenizer

    from rawtune.evaluate import perplexity, scoring_blocks
    from rawtune.models import load_causal_lm
    from rawtune.rundir import RunDir

    run = RunDir(work / "tiny-run")
    merged = tiny_model(run.path / "merged", tiny_tokenizer(work / "tokenizer"), "llama", hidden=256, seed=1)
    ids = AutoTokenizer.from_pretrained(merged)(" ".join(sentences(600)))["input_ids"]
    blocks = np.asarray(ids[: (len(ids) // 64) * 64], dtype=np.int32).reshape(-1, 64)
    if len(blocks) < 30:
        raise SystemExit(f"--tiny: the test corpus gave {len(blocks)} blocks of 64 tokens, fewer than 30")
    run.data_dir.mkdir(parents=True, exist_ok=True)
    np.save(run.data_dir / "train.npy", blocks[:-4])
    np.save(run.data_dir / "heldout.npy", blocks[-4:])
    model = load_causal_lm(merged, device="cpu", dtype=torch.float32).eval()
    run.update(export={"ppl_merged": perplexity(model, scoring_blocks(blocks[-4:]))})
    return run.path


def main(argv=None) -> int:
    from rawtune.evaluate import scoring_blocks
    from rawtune.export import gguf_writer, imatrix, steps
    from rawtune.export.llama import load_llama

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="make a tiny run directory in --work first (CPU smoke run)")
    p.add_argument("--variants", default="plain:1,grad:1,compensated")
    p.add_argument("--per-block", action="store_true")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        a.run = tiny_run(a.work)
    if a.run is None:
        p.error("RUN is required (or --tiny)")
    f16, default = a.work / "m.F16.gguf", a.work / "m.Q4_K_M.default.gguf"
    if not f16.exists():
        gguf_writer.convert(a.run / "merged", f16, "f16", name="m")
    if not default.exists():
        steps.quantize(f16, default, "Q4_K_M", a.work / "quantize.log")
    held = scoring_blocks(np.load(a.run / "data/heldout.npy"))
    train = np.load(a.run / "data/train.npy", mmap_mode="r")
    calib, rest = imatrix.pick_blocks(train, 16, with_rest=True)
    calib, check = np.asarray(calib, dtype=np.int64), np.asarray(imatrix.pick_blocks(rest, 8), dtype=np.int64)
    merged = json.loads((a.run / "run.json").read_text())["export"]["ppl_merged"]

    def losses(path: Path, blocks: np.ndarray) -> np.ndarray:
        llm = load_llama(path, n_ctx=blocks.shape[1], logits_all=True)
        try:
            return np.array([steps._nll_from_logits(steps.llama_logits(llm, b), b)[:2] for b in blocks])
        finally:
            del llm

    def ppl(rows: np.ndarray) -> float:
        return float(np.exp(rows[:, 0].sum() / rows[:, 1].sum()))

    stats = {}
    base_held, base_check = losses(default, held), losses(default, check)
    base_inc = ppl(base_held) / merged - 1
    lines = [f"run {a.run.name}: merged model {merged:.4f} on {len(held)} held-out blocks of {held.shape[1]}",
             "| variant | held-out ppl | increase | / default's | check blocks |", "|---|---|---|---|---|",
             f"| llama.cpp default | {ppl(base_held):.4f} | {100 * base_inc:+.2f} % | 1.00 x | {ppl(base_check):.4f} |"]
    for variant in a.variants.split(","):
        kind, power = (variant.split(":") + ["1"])[:2]
        source = "plain" if kind == "plain" else "grad"  # grad and compensated share one pass
        if source not in stats:
            stats[source] = (plain_statistic(a.run / "merged", calib) if kind == "plain"
                             else imatrix.compute(a.run / "merged", calib, "bench"))
        stat = stats[source]
        if kind == "compensated":
            matrix, label = stat, "compensated rounding (export's file)"
        else:
            values = stat if kind == "plain" else stat.values
            values = {k: (np.asarray(v, dtype=np.float64) ** float(power)).astype(np.float32) for k, v in values.items()}
            matrix, label = imatrix.Imatrix(values, len(calib), int(calib.size), kind), f"{kind} mean x², power {power}"
        out = a.work / f"m.{kind}{power}.gguf"
        imatrix.quantize_file(f16, default, out, matrix, 2)
        h, c = losses(out, held), losses(out, check)
        inc = ppl(h) / merged - 1
        first = len(lines)
        lines.append(f"| {label} | {ppl(h):.4f} | {100 * inc:+.2f} % | {inc / base_inc:.2f} x "
                     f"| {ppl(c):.4f} |")
        if a.per_block:
            d = h[:, 0] / h[:, 1] - base_held[:, 0] / base_held[:, 1]
            lines.append(f"|  per block, loss - default's | mean {d.mean():+.4f} | se {d.std(ddof=1) / np.sqrt(len(d)):.4f} | | |")
        print("\n".join(lines[first:]), flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
