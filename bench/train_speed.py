"""Training speed and loss parity on one GPU: transformers+PEFT, Unsloth and rawtune's default.

One call measures everything side by side, each variant in its own process (``import unsloth``
patches transformers globally), on the SmolLM2-135M architecture with random weights, sequence
2048 and the seed's LoRA recipe (r=128, alpha=64, rsLoRA, 7 projections + embed_tokens/lm_head,
effective batch 16 blocks). Baselines run a bare loop (forward, backward, fused AdamW), so they
are measured at their best; rawtune's default runs through ``rawtune.train.train`` as a user gets it.

    python bench/train_speed.py speed  --tokenizer TOKDIR --work bench-work --out OUTDIR
    python bench/train_speed.py parity --tokenizer TOKDIR --work bench-work --out OUTDIR
    python bench/train_speed.py profile --tokenizer TOKDIR --work bench-work --out OUTDIR

TOKDIR is a tokenizer folder with SmolLM2's 49,152-token vocabulary.

On a CPU, ``--tiny`` runs ``speed`` on a two-layer model of the same kind with 64-token blocks and
the test tokenizer (no ``--tokenizer`` needed): the PEFT bare loop and rawtune's ``train()`` run
end to end; Unsloth, the 16 GiB cap and the CUDA-only switches are skipped with a note. A smoke
test of the code, not a measurement::

    python bench/train_speed.py speed --tiny --work /tmp/ts --out /tmp/ts-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SMOL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 0, "attention_bias": False, "mlp_bias": False}
T, EFFECTIVE = 2048, 16
# --tiny on a CPU: the same architecture kind, small enough to train in seconds.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)
TINY_T = 64
TINY_VARIANTS = ("peft_b16", "rawtune")  # the others need Unsloth, a CUDA memory cap or CUDA kernels


def use_tiny() -> None:
    """Switch this process to the --tiny shapes (the parent and every variant's process)."""
    global T
    SMOL.update(TINY)
    T = TINY_T


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    """Peak allocated GPU memory, or on a CPU the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)

# name: (engine, micro-batch, gradient checkpointing)
SPEED = {
    "peft_b16": ("peft", 16, "off"),
    "unsloth_seed": ("unsloth", 2, "unsloth"),
    "unsloth_b8": ("unsloth", 8, "off"),
    "unsloth_b16": ("unsloth", 16, "off"),
    "rawtune": ("rawtune", 0, "auto"),
    "rawtune_unfused_lora": ("rawtune", 0, "auto"),  # RAWTUNE_FUSED_LORA=0: LoRA B products separate
    "rawtune_eager": ("rawtune", 0, "auto"),  # RAWTUNE_COMPILE=0: no torch.compile
    "rawtune_16gib": ("rawtune", 0, "auto"),  # planned for and held to 16 GiB
    "rawtune_flash_attn": ("rawtune", 0, "auto"),  # RAWTUNE_SDPA=flash instead of PyTorch's pick (cuDNN)
}
ENV = {"rawtune_unfused_lora": {"RAWTUNE_FUSED_LORA": "0"}, "rawtune_eager": {"RAWTUNE_COMPILE": "0"},
       "rawtune_16gib": {"RAWTUNE_GPU_MEMORY_GIB": "16"}, "rawtune_flash_attn": {"RAWTUNE_SDPA": "flash"}}


def build_model(work: Path, tokenizer: Path) -> Path:
    """The SmolLM2-135M architecture with random bf16 weights and the given tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = work / "smollm2-arch"
    if (path / "model.safetensors").is_file():
        return path
    if tokenizer is None:  # --tiny: the test tokenizer, inside the tiny vocabulary
        from tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer(work / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOL), dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    return path


def recipe(model_dir: Path, **overrides):
    """The seed's recipe (the 'standard' preset) as resolved settings."""
    from rawtune.settings import RunSettings, apply, validate

    values = dict(model=str(model_dir), preset="standard", seq_len=T, eval_steps=0, save_steps=100000, optimizer="adamw_torch")
    values.update(overrides)
    return validate(apply(RunSettings(), values))


def random_run(work: Path, name: str, model_dir: Path, steps: int):
    """A run directory with random token blocks, so train() can run without the data stage."""
    import numpy as np

    from rawtune.rundir import RunDir

    run = RunDir(work / name)
    shutil.rmtree(run.path, ignore_errors=True)
    run.data_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(run.data_dir / "train.npy", rng.integers(0, SMOL["vocab_size"], (EFFECTIVE * steps, T), dtype=np.int32))
    np.save(run.data_dir / "heldout.npy", rng.integers(0, SMOL["vocab_size"], (4, T), dtype=np.int32))
    run.update(model={"spec": str(model_dir), "local_dir": str(model_dir), "upstream_id": None,
                      "source": "local", "license": None})
    return run


def bare_step(model, opt, params: list, data, micro: int):
    """One optimizer step over all of ``data`` in micro-batches of ``micro``: forward, backward,
    clip at 1.0, AdamW; the loss without the Trainer or rawtune's loops (returns the step function)."""
    import torch

    accum = len(data) // micro

    def step():
        total = 0.0
        for s in range(0, len(data), micro):
            x = data[s:s + micro]
            loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step


def speed_one(name: str, model_dir: Path, work: Path, steps: int, warmup: int) -> dict:
    """One variant in this process: tokens/s over the timed steps and peak memory."""
    import torch

    engine, micro, gc = SPEED[name]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if engine == "rawtune":
        return rawtune_speed(name, model_dir, work, steps + warmup)
    from rawtune.train.hf_loop import load_peft, load_unsloth
    from rawtune.train.optim import param_groups

    settings = recipe(model_dir, backend=engine, gradient_checkpointing=gc, batch_size=micro,
                      grad_accum=EFFECTIVE // micro)
    t = settings.train
    t0 = time.time()
    model = (load_unsloth if engine == "unsloth" else load_peft)(t, str(model_dir))
    load_s = time.time() - t0
    model.train()
    opt = torch.optim.AdamW(param_groups(model, t.learning_rate, t.embedding_learning_rate, 0.0),
                            fused=torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=device()).manual_seed(0)
    data = torch.randint(0, SMOL["vocab_size"], (EFFECTIVE, T), device=device(), generator=g)
    losses = []

    step = bare_step(model, opt, params, data, micro)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.time()
    for _ in range(steps):
        losses.append(step())
    sync()
    elapsed = time.time() - t0
    return {"variant": name, "micro": micro, "accum": EFFECTIVE // micro, "gc": gc, "load_s": round(load_s, 1),
            "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2),
            "step_ms": round(1000 * elapsed / steps, 1), "tok_s": round(steps * EFFECTIVE * T / elapsed),
            "peak_GiB": peak_gib(), "loss": round(float(losses[-1]), 3)}


def rawtune_speed(name: str, model_dir: Path, work: Path, steps: int) -> dict:
    """rawtune's default through train(): tokens/s as its own progress events report them."""
    import torch

    from rawtune.train import train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    os.environ.update(ENV.get(name, {}))
    if name == "rawtune_16gib":  # plan for, and hold to, a 16 GiB card
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(16 * 2**30 / total)
    settings = recipe(model_dir, max_steps=steps, optimizer="auto")
    run = random_run(work, name, model_dir, steps)
    lines: list[str] = []
    t0 = time.time()
    record = train(settings, run, log=lambda s: (lines.append(s), print(s, flush=True)))
    events = [e for e in record.history if e["type"] == "step"]
    eff = record.effective_settings
    return {"variant": name, "micro": eff["batch_size"], "accum": eff["grad_accum"], "gc": eff["gradient_checkpointing"],
            "load_s": round(time.time() - t0 - record.seconds, 1), "wall_s": record.seconds,
            "step_ms": round(EFFECTIVE * T / events[-1]["tokens_per_s"] * 1000, 1),
            "tok_s": round(events[-1]["tokens_per_s"]),
            "peak_GiB": peak_gib(), "loss": round(events[-1]["loss"], 3),
            "plan": [s for s in lines if s.startswith("[gpu]")]}


def profile_one(model_dir: Path, out: Path) -> dict:
    """Kernel time of two steps of the fast loop at the default plan, grouped by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rawtune.train import fast_loop as fastloop
    from rawtune.train.plan import plan
    from rawtune.train.hf_loop import load_unsloth

    t, _plan = plan(recipe(model_dir).train, str(model_dir))
    model = load_unsloth(t, str(model_dir))
    net = fastloop.extract(model)
    fastloop.upcast_trainable(net)
    fast = fastloop.FastModel(net)
    opt = fastloop.make_optimizer(model, t)
    ids = torch.randint(0, SMOL["vocab_size"], (t.batch_size, T), device="cuda")
    labels = fastloop.shifted_labels(ids, t.batch_size)
    n = (labels >= 0).sum().float()

    def step():
        fast.loss(ids, labels, n).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in net.trainable], 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    step_ms = (time.time() - t0) / 5 * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    (out / "profile.txt").write_text(table)
    groups: dict[str, float] = {}
    total = 0.0
    for e in prof.key_averages():
        us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if us <= 0:
            continue
        key = e.key.lower()
        kind = ("attention" if any(k in key for k in ("flash", "fmha", "attention", "cudnn", "sdpa"))
                else "gemm" if any(k in key for k in ("gemm", "cutlass", "sm90", "nvjet", "xmma", "cublas"))
                else "triton (fused elementwise, CE)" if "triton" in key
                else "optimizer" if ("adam" in key or "foreach" in key or "multi_tensor" in key)
                else "other")
        groups[kind] = groups.get(kind, 0.0) + us
        total += us
    share = {k: f"{v / 2000:.1f} ms/step ({100 * v / max(total, 1):.0f}%)"
             for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    tokens = t.batch_size * T
    return {"variant": "profile", "micro": t.batch_size, "step_ms": round(step_ms, 1),
            "tok_s": round(tokens / step_ms * 1000), "gpu_ms_per_step": round(total / 2000, 1), "by_kind": share}


def parity_one(name: str, model_dir: Path, corpus: Path, work: Path, seed: int, steps: int) -> dict:
    """Loss curve of one training run on the learnable corpus (same recipe, same tokens)."""
    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import RunSettings, apply

    values = dict(out=str(work / f"parity-{name}-{seed}"), dataset=str(corpus), model=str(model_dir),
                  preset="standard", seq_len=T,
                  max_steps=steps, learning_rate=5e-4, embedding_learning_rate=5e-5, seed=seed,
                  eval_steps=0, save_steps=100000, optimizer="adamw_torch", stages=["data", "train"])
    if name == "unsloth_seed":
        os.environ["RAWTUNE_FASTLOOP"] = "0"
        values.update(backend="unsloth", gradient_checkpointing="unsloth", batch_size=2, grad_accum=8)
    shutil.rmtree(values["out"], ignore_errors=True)
    run_pipeline(apply(RunSettings(), values), log=lambda s: print(s, flush=True))
    record = RunDir(values["out"]).load()["train"]
    losses = [round(e["loss"], 4) for e in record["history"] if e["type"] == "step"]
    return {"variant": f"parity_{name}", "seed": seed, "losses": losses,
            "micro": record["effective_settings"]["batch_size"]}


def spawn(args: list[str], out: Path, tag: str, timeout: int = 400) -> dict | None:
    """Run one variant in a fresh process; its last stdout line is its JSON result."""
    log = out / "logs.txt"
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    with log.open("a") as handle:
        handle.write(f"\n===== {tag} rc={proc.returncode} {time.time() - t0:.0f}s\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}\n")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{tag} failed (rc {proc.returncode}); tail of stderr:\n{proc.stderr[-1500:]}", flush=True)
    return None


def card() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU only, torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "parity", "profile", "one"])
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--variants", default=",".join(SPEED))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--seeds", default="3407,1")
    parser.add_argument("--parity-steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model (speed mode only)")
    a = parser.parse_args()
    if a.tiny:
        use_tiny()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = a.work / "smollm2-arch"
    if a.mode == "one":
        if a.variant == "profile":
            result = profile_one(model_dir, a.out)
        elif a.variant.startswith("parity_"):
            result = parity_one(a.variant[7:], model_dir, a.work / "corpus.jsonl", a.work, a.seed, a.parity_steps)
        else:
            result = speed_one(a.variant, model_dir, a.work, a.steps, a.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if a.tokenizer is None and not a.tiny:
        parser.error("--tokenizer is required (or --tiny)")
    if a.tiny and a.mode != "speed":
        parser.error("--tiny runs the speed mode only (profile and parity need CUDA and Unsloth)")
    build_model(a.work, a.tokenizer)
    print(f"card: {card()}", flush=True)
    results = []
    common = ["--work", str(a.work), "--out", str(a.out)] + (["--tiny"] if a.tiny else [])
    if a.tiny:
        skipped = [n for n in a.variants.split(",") if n not in TINY_VARIANTS]
        a.variants = ",".join(n for n in a.variants.split(",") if n in TINY_VARIANTS)
        if skipped:
            print(f"--tiny on a CPU: skipped {', '.join(skipped)} (Unsloth, the 16 GiB cap and the CUDA "
                  "switches need a GPU)", flush=True)
    if a.mode == "profile":
        results.append(spawn(["one", "profile", *common], a.out, "profile"))
    if a.mode == "speed":
        for name in a.variants.split(","):
            r = spawn(["one", name, *common, "--steps", str(a.steps), "--warmup", str(a.warmup)], a.out, name)
            if r:
                results.append(r)
                print(json.dumps(r), flush=True)
        table(results)
    if a.mode == "parity":
        from tiny import write_corpus

        write_corpus(a.work / "corpus.jsonl", documents=9000, seed=0)
        for seed in a.seeds.split(","):
            for name in ("rawtune", "unsloth_seed"):
                r = spawn(["one", f"parity_{name}", *common, "--seed", seed, "--parity-steps", str(a.parity_steps)],
                          a.out, f"parity {name} {seed}")
                if r:
                    results.append(r)
                    print(json.dumps(r), flush=True)
        parity_table(results)
    (a.out / f"{a.mode}.json").write_text(json.dumps({"card": card(), "results": results}, indent=1))


def table(results: list[dict]) -> None:
    by = {r["variant"]: r for r in results}
    seed = by.get("unsloth_seed", {}).get("tok_s")
    best_unsloth = max((r["tok_s"] for n, r in by.items() if n.startswith("unsloth")), default=None)
    print("\n| variant | micro x accum | checkpointing | tokens/s | peak GiB | vs Unsloth seed | vs best Unsloth |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        def ratio(base, r=r):
            return f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['micro']} x {r['accum']} | {r['gc']} | {r['tok_s']:,} | {r['peak_GiB']} | "
              f"{ratio(seed)} | {ratio(best_unsloth)} |")


def parity_table(results: list[dict]) -> None:
    print("\n| run | seed | loss at steps 1..N |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['seed']} | {' '.join(f'{x:.3f}' for x in r['losses'])} |")


if __name__ == "__main__":
    main()
