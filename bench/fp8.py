"""FP8 frozen base weights against bf16 in the fast loop: speed, memory and quality, one call.

For each shape (SmolLM2-135M and Llama-3.2-1B, random weights built on the machine, or a real
model folder with ``--model``), three runs of the same steps in one process: bf16, bf16 again with
another LoRA seed (the run-to-run noise) and FP8 base weights (``extract(fp8=True)``), each through
rawtune's flattened fast model (compiled on CUDA), the seed's LoRA recipe on the 7 projections and
fused AdamW. Data: a real text file (``--text``, tokenized by the model folder's tokenizer) or a
seeded Markov chain over the vocabulary (learnable, so the loss falls on random weights). Reports
per run tok/s (after the warm-up steps), peak memory while training (and while building), the loss
curve and held-out perplexity; per shape the FP8-bf16 loss difference next to the bf16-bf16 one,
and the perplexity difference in %.

    python bench/fp8.py --out OUTDIR [--shapes 135m,1b] [--steps 60] [--model DIR | --gguf FILE] [--text FILE]
    python bench/fp8.py --tiny --out OUTDIR      # CPU smoke run (reference FP8 path, no compile)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from card_caps import PROJECTIONS, SHAPES  # noqa: E402  (the benches' one declaration of the shapes)

TINY_LAYOUT = dict(seq=32, micro=2, accum=2, steps=4, warmup=1, held=4)
GPU_LAYOUT = dict(seq=2048, micro=8, accum=2, steps=60, warmup=3, held=16)
# A real corpus is small (the example corpus is ~110k SmolLM2 tokens): shorter blocks, the quick
# start's learning rate and about two passes over it, so the runs are compared while still learning.
# (At seq 2048, lr 1e-3 and 60 steps an H100 run memorised its 37 blocks, training loss 0.01, and the
# two bf16 seeds' held-out perplexities differed by 5 %: no comparison at 0.3 %.)
TEXT_LAYOUT = dict(seq=512, micro=8, accum=2, steps=24, warmup=3, held=16, lr=2e-4)


def markov_blocks(vocab: int, n: int, seq: int, seed: int) -> np.ndarray:
    """[n, seq] token blocks of an order-1 chain: each token has 8 successors of Zipf-like weight."""
    rng = np.random.default_rng(1234)  # the chain itself is the same for train and held-out data
    nxt = rng.integers(0, vocab, size=(vocab, 8))
    p = 1.0 / np.arange(1, 9)
    p /= p.sum()
    draw = np.random.default_rng(seed)
    out = np.empty((n, seq), dtype=np.int64)
    out[:, 0] = draw.integers(0, vocab, size=n)
    choice = draw.choice(8, size=(n, seq), p=p)
    for t in range(1, seq):
        out[:, t] = nxt[out[:, t - 1], choice[:, t]]
    return out


def text_blocks(model_dir: str, text: str, seq: int, held: int) -> tuple:
    from transformers import AutoTokenizer

    raw = Path(text).read_text(errors="replace")
    if text.endswith(".jsonl"):  # rawtune's corpus format: one {"text": ...} record per line
        raw = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
    ids = AutoTokenizer.from_pretrained(model_dir)(raw)["input_ids"]
    blocks = np.asarray(ids[: len(ids) // seq * seq], dtype=np.int64).reshape(-1, seq)
    if len(blocks) <= held:
        raise SystemExit(f"{text}: {len(blocks)} blocks of {seq} tokens; need more than {held}")
    return blocks[held:], blocks[:held]


def build(shape: str, model_dir, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_dir:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    cfg = dict(SHAPES[shape], rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)  # the same base weights in every run of a shape
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(dtype)


def one_run(shape: str, args, use_fp8: bool, lora_seed: int, train, held, layout: dict, device) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from rawtune.train import fast_loop

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, args.model, device, dtype)
    torch.manual_seed(lora_seed)
    model = get_peft_model(model, LoraConfig(r=128, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                             target_modules=PROJECTIONS))
    net = fast_loop.extract(model, dtype, fp8=use_fp8)
    fast_loop.upcast_trainable(net)
    back = fast_loop.offload_frozen(model) if use_fp8 and cuda else (lambda: None)
    fast = fast_loop.FastModel(net, compile=cuda and not args.eager, log=lambda line: None)
    params = [p for _, p in net.trainable]
    opt = torch.optim.AdamW(params, lr=layout["lr"], fused=cuda)
    seq, micro, accum = layout["seq"], layout["micro"], layout["accum"]
    tb = torch.from_numpy(train).to(device)
    order = np.random.default_rng(0)  # the same blocks in the same order for every run
    losses, started, tokens = [], None, 0
    setup_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the training peak, apart from building the model
    for step in range(layout["steps"]):
        if step == layout["warmup"]:
            sync(device)
            started = time.time()
        idx = torch.from_numpy(order.integers(0, len(train), size=micro * accum)).to(device)
        n_items = torch.tensor(float(micro * accum * (seq - 1)), device=device)
        total = torch.zeros((), device=device)
        for m in range(accum):
            ids = tb[idx[m * micro:(m + 1) * micro]]
            fast.begin()
            loss = fast.loss(ids, fast_loop.shifted_labels(ids, len(ids)), n_items)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
        if step >= layout["warmup"]:
            tokens += micro * accum * seq
    sync(device)
    seconds = max(time.time() - (started or time.time()), 1e-9)
    eval_loss = fast_loop.evaluate(fast, torch.from_numpy(held).to(device), micro)
    out = {"shape": shape, "fp8": use_fp8, "lora_seed": lora_seed, "tokens_per_s": round(tokens / seconds),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "setup_peak_gib": round(setup_gib, 2) if cuda else None,
           "losses": [round(x, 4) for x in losses], "heldout_loss": round(eval_loss, 5),
           "heldout_ppl": round(math.exp(eval_loss), 4)}
    back()
    del fast, net, model, opt, tb
    gc.collect()
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(runs: list[dict], layout: dict) -> dict:
    """FP8 against bf16, and bf16 against its second seed (the noise the FP8 difference is held to)."""
    bf, noise, low = runs
    tail = slice(layout["steps"] // 2, None)

    def gap(a, b):
        return round(float(np.mean(np.abs(np.array(a["losses"][tail]) - np.array(b["losses"][tail])))), 5)

    speedup = round(low["tokens_per_s"] / bf["tokens_per_s"], 3) if bf["tokens_per_s"] else None  # no timed step
    return {"shape": bf["shape"], "speedup": speedup,
            "peak_gib_bf16": bf["peak_gib"], "peak_gib_fp8": low["peak_gib"],
            "loss_gap_fp8_vs_bf16": gap(low, bf), "loss_gap_bf16_seeds": gap(noise, bf),
            "heldout_ppl_diff_pct": round(100 * (low["heldout_ppl"] / bf["heldout_ppl"] - 1), 3),
            "heldout_ppl_diff_pct_bf16_seeds": round(100 * (noise["heldout_ppl"] / bf["heldout_ppl"] - 1), 3)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run on a tiny shape")
    ap.add_argument("--shapes", default="135m,1b")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: the layout's)")
    ap.add_argument("--micro", type=int, default=0, help="micro-batch (default: the layout's)")
    ap.add_argument("--lr", type=float, default=0, help="learning rate (default 1e-3; 2e-4 with --text)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--model", help="a real model folder instead of random weights (one shape)")
    ap.add_argument("--gguf", help="a GGUF to dequantize into the model folder (rawtune's offline default's way)")
    ap.add_argument("--text", help="a text or .jsonl file for training and held-out blocks (else a Markov chain)")
    args = ap.parse_args()
    if args.gguf:
        from rawtune.models import convert_gguf

        args.model = str(convert_gguf(Path(args.gguf)))
    layout = {"lr": 1e-3, **(TINY_LAYOUT if args.tiny else TEXT_LAYOUT if args.text else GPU_LAYOUT)}
    layout.update({k: v for k, v in (("steps", args.steps), ("micro", args.micro), ("lr", args.lr)) if v})
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shapes = ["tiny-1b"] if args.tiny else ([Path(args.model).name] if args.model else args.shapes.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "layout": layout, "runs": [], "compare": []}
    for shape in shapes:
        vocab = SHAPES[shape]["vocab_size"] if shape in SHAPES else None
        n_train = layout["micro"] * layout["accum"] * layout["steps"]
        if args.text:
            train, held = text_blocks(args.model, args.text, layout["seq"], layout["held"])
        else:
            if vocab is None:
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(args.model).vocab_size
            train = markov_blocks(vocab, n_train, layout["seq"], seed=1)
            held = markov_blocks(vocab, layout["held"], layout["seq"], seed=2)
        runs = [one_run(shape, args, f, s, train, held, layout, device) for f, s in ((False, 0), (False, 1), (True, 0))]
        report["runs"] += runs
        report["compare"].append(compare(runs, layout))
        print(json.dumps(report["compare"][-1]), flush=True)
    (out / "fp8.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
