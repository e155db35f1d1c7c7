"""Data-parallel scaling of ``rawtune train``: 1 GPU against 2, same tokens, then a resume on 1 GPU.

One call on a machine with two GPUs measures, each as the real command line in its own process:

1. ``rawtune train`` on one GPU;
2. the same command with ``--gpus 2`` (torchrun, two processes, NCCL), same effective batch and
   steps, so the same tokens;
3. ``rawtune train --out <the 2-GPU run> --resume`` on one GPU: it continues from the 2-GPU run's
   checkpoint (at two thirds of the steps, ``--save-at``) to the same last step, so its losses
   after the checkpoint can be compared with both runs above;
4. with ``--gpus 1,2,4`` (a machine with 4 GPUs), the same command with ``--gpus 4`` too;
5. with ``--repeat``, the one-GPU command once more: how far two runs of the same command drift
   apart (bf16 kernels and atomic adds are not bit-reproducible), the floor for the differences above.

Model: the SmolLM2-135M architecture (30 layers, hidden 576, 9/3 heads, vocab 49,152, tied) with
random bf16 weights, built on the machine by ``bench/card_caps.py``'s builder (its padded BPE
tokenizer); data: ``tests/tiny.py``'s repetitive corpus, so the loss falls and curves can be
compared. Settings: the ``standard`` preset (r=128 rsLoRA on 7 projections + embed_tokens/lm_head),
sequence 2048, micro-batch 16 x 2 accumulation (32 blocks, 65,536 tokens per optimizer step) kept
as given (``--gradient-checkpointing off``), so one GPU runs two micro-batches of 16 per step and
each of two GPUs runs one. ``--backend peft`` in every run: several processes always load the model
with PEFT, and the one-GPU run must start from the same LoRA initialisation to compare losses (the
fast loop trains either loader's model at the same speed). tokens/s is rawtune's own figure (timed from the end of the first
step, so compiling is left out) twice: at the last step before the checkpoint (training alone,
the speed-up that measures scaling) and at the last step (the whole job, with the checkpoint that
rank 0 writes while the other ranks wait).

It prints a markdown table last (card, command, tokens/s, speed-up, losses) and writes
``multi_gpu.json`` and the full logs (``multi_gpu.log``) to ``$OUT`` (else ``--work``).

On the GPU machine (2 GPUs; carry ``.device-bundle``; about 5 minutes)::

    mkdir -p /tmp/site && tar -C /tmp/site -xJf .device-bundle/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1; python bench/multi_gpu.py --work /tmp/multi_gpu --steps 45 --budget 300

On a CPU, ``--tiny`` runs the same three commands on a tiny model in CPU processes (gloo)::

    PYTHONPATH=$PWD python bench/multi_gpu.py --tiny --work /tmp/multi_gpu_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

# The benchmark case and its CPU stand-in, from card_caps' table of shapes.
SHAPE_NAMES = {"135m": "135m", "tiny": "tiny-1b"}


def build(model_dir: Path, shape: str) -> dict:
    """The random-weight model (card_caps' builder), unless an earlier call left it."""
    from card_caps import SHAPES, build_small

    done = model_dir / "built.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "reused": True}
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    t0 = time.time()
    info = build_small(model_dir, SHAPES[SHAPE_NAMES[shape]])
    info["build_s"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(info))
    return info


def train_command(a, out: Path, model_dir: Path, corpus: Path, gpus: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "rawtune.cli", "train", "--out", str(out)]
    if resume:  # the Trainer path (--tiny) also saves at the last step: give it two more steps there
        return cmd + ["--resume"] + (["--max-steps", str(a.steps + 2)] if a.tiny else [])
    cmd += ["--dataset", str(corpus), "--model", str(model_dir), "--preset", "standard", "--backend", "peft",
            "--seq-len", str(a.seq), "--batch-size", str(a.micro), "--grad-accum", str(a.accum),
            "--gradient-checkpointing", "off", "--max-steps", str(a.steps), "--save-steps", str(a.save_at),
            "--eval-steps", "0", "--logging-steps", str(max(a.steps // 6, 1))]
    if a.tiny:  # the CPU trains fp32 on the Trainer path; keep its optimizer explicit
        cmd += ["--optimizer", "adamw_torch"]
    return cmd + (["--gpus", str(gpus)] if gpus > 1 else [])


def run(tag: str, cmd: list[str], log: Path, limit_s: float) -> dict:
    """Run one command line; its exit code and seconds (its output goes to the shared log).

    Past ``limit_s`` the command and every process under it (torchrun, its workers, compile
    workers) are killed, so a hung run cannot hold the GPUs for the next one.
    """
    t0 = time.time()
    with log.open("a") as handle:
        handle.write(f"\n===== {tag}: {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            rc = "timeout"
    print(f"{tag}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    return {"rc": rc, "wall_s": round(time.time() - t0, 1)}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc: torchrun starts its workers in their own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def summary(run_dir: Path) -> dict:
    """What run.json says about the training: steps, losses per step, tokens/s, held-out ppl, files."""
    record = json.loads((run_dir / "run.json").read_text())
    train, metrics = record.get("train", {}), record.get("metrics", {})
    steps = [e for e in train.get("history", []) if e["type"] == "step"]
    eff = train.get("effective_settings", {})
    return {"steps": train.get("steps"), "resumed_from_step": train.get("resumed_from_step"),
            "losses": {e["step"]: round(e["loss"], 4) for e in steps},
            "tok_s": round(steps[-1]["tokens_per_s"]) if steps else None,
            # rawtune's figure at the last step before the first checkpoint: training alone (it is timed
            # from the end of step 1; the checkpoint, written by rank 0 only, counts in tok_s above)
            "train_tok_s": _before_checkpoint(steps, record),
            "micro": eff.get("batch_size"), "accum": eff.get("grad_accum"),
            "ppl_base": metrics.get("ppl_base"), "ppl_tuned": metrics.get("ppl_tuned"),
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")),
            "files": sorted(p.name for p in run_dir.iterdir())}


def _before_checkpoint(steps: list, record: dict) -> int | None:
    save = (record.get("settings") or {}).get("train", {}).get("save_steps") or \
        (record.get("train", {}).get("effective_settings") or {}).get("save_steps")
    first = record.get("train", {}).get("resumed_from_step") or 0
    before = [e for e in steps if save and first < e["step"] <= save]
    return round(before[-1]["tokens_per_s"]) if before else None


def card() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU processes (gloo), torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"


def max_diff(a: dict, b: dict, steps) -> float | None:
    both = [s for s in steps if s in a and s in b]
    return round(max(abs(a[s] - b[s]) for s in both), 4) if both else None


def table(c: str, a, res: dict) -> None:
    runs = [(f"{n} GPU{'s' if n > 1 else ''}", res.get(f"gpus{n}") or {},
             "rawtune train ..." + (f" --gpus {n}" if n > 1 else "")) for n in a.gpus]
    back = res.get("resume") or {}
    runs.append((f"2-GPU checkpoint-{back.get('resumed_from_step') or '?'} resumed on 1 GPU", back,
                 "rawtune train --out RUN --resume"))
    one, two = res.get("gpus1") or {}, res.get("gpus2") or {}
    half = a.save_at
    print(f"\ncard: {c}; {a.steps} steps of {a.micro * a.accum} blocks x {a.seq} tokens "
          f"({a.micro * a.accum * a.seq * a.steps:,} tokens per run)\n")
    print("| run | command | micro x accum | tokens/s, training (before the checkpoint) | speed-up | "
          "tokens/s, whole job | speed-up | loss at step 1 | loss at last step | held-out ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base, base_train = one.get("tok_s"), one.get("train_tok_s")
    for name, r, command in runs:
        if not r:
            print(f"| {name} | `{command}` | failed, see the log | | | | | | | |")
            continue
        losses = {int(k): v for k, v in r["losses"].items()}
        speed = f"{r['tok_s'] / base:.2f}x" if base and r.get("tok_s") else "-"
        train = r.get("train_tok_s")
        speed_train = f"{train / base_train:.3f}x" if base_train and train else "-"
        ppl = f"{r['ppl_base']:.2f} -> {r['ppl_tuned']:.2f}" if r.get("ppl_tuned") else "-"
        print(f"| {name} | `{command}` | {r['micro']} x {r['accum']} | {f'{train:,}' if train else '-'} | "
              f"{speed_train} | {r['tok_s']:,} | {speed} | {losses.get(1, '-')} | {losses.get(max(losses), '-')} | {ppl} |")
    curves = {n: {int(k): v for k, v in (res.get(f"gpus{n}") or {}).get("losses", {}).items()} for n in a.gpus}
    l3 = {int(k): v for k, v in back.get("losses", {}).items()}
    second = range(half + 1, a.steps + 1)
    for n in a.gpus[1:]:
        print(f"\nlargest loss difference per step, 1 GPU vs {n} GPUs (steps 1..{a.steps}): "
              f"{max_diff(curves.get(1, {}), curves[n], range(1, a.steps + 1))}")
    if res.get("again"):
        again = {int(k): v for k, v in res["again"]["losses"].items()}
        print(f"1 GPU vs the same command run again (steps 1..{a.steps}): "
              f"{max_diff(curves.get(1, {}), again, range(1, a.steps + 1))}; "
              f"its training tokens/s {res['again'].get('train_tok_s')}")
    print(f"resumed vs 2 GPUs (steps {half + 1}..{a.steps}): {max_diff(l3, curves.get(2, {}), second)}; "
          f"resumed vs 1 GPU: {max_diff(l3, curves.get(1, {}), second)}")
    print(f"2-GPU run directory: {two.get('files')}; checkpoints {two.get('checkpoints')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/multi_gpu", help="scratch folder (model, corpus, run directories)")
    p.add_argument("--steps", type=int, default=45, help="optimizer steps per run")
    p.add_argument("--save-at", type=int, default=None,
                   help="the step of the checkpoint the 1-GPU resume starts from (default: two thirds of --steps)")
    p.add_argument("--tiny", action="store_true", help="a tiny model in CPU processes, to exercise the code")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole call; a run past it is killed")
    p.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated (1 and 2 always; e.g. 1,2,4)")
    p.add_argument("--repeat", action="store_true",
                   help="run the one-GPU command a second time, for the run-to-run loss difference")
    a = p.parse_args()
    a.gpus = sorted({1, 2, *(int(n) for n in a.gpus.split(","))})
    deadline = time.time() + a.budget
    a.seq, a.micro, a.accum = (64, 2, 2) if a.tiny else (2048, 16, 2)
    if a.tiny:
        a.steps = min(a.steps, 6)
        os.environ.setdefault("RAWTUNE_COMPILE", "0")
    a.save_at = a.save_at or max(1, a.steps * 2 // 3)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else work
    out.mkdir(parents=True, exist_ok=True)
    log = out / "multi_gpu.log"
    log.write_text("")
    for name in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):  # multicast stays off on these machines
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    from tiny import write_corpus

    c = card()
    print(f"card: {c}", flush=True)
    model_dir = work / ("tiny-model" if a.tiny else "smollm2-135m-shape")
    built = run("build", [sys.executable, __file__, "--build-only", str(model_dir), "tiny" if a.tiny else "135m"],
                log, 180) if not (model_dir / "built.json").is_file() else {"rc": 0, "reused": True}
    corpus = write_corpus(work / "corpus.jsonl", documents=600 if a.tiny else 9000, seed=0)
    res: dict = {"card": c, "build": built, "steps": a.steps, "seq": a.seq, "micro": a.micro, "accum": a.accum}
    plan = [(f"gpus{n}", n, False, f"run-{n}gpu") for n in a.gpus]
    plan.insert(2, ("resume", 1, True, "run-2gpu"))  # right after the 2-GPU run, before larger counts
    if a.repeat:
        plan.append(("again", 1, False, "run-1gpu-again"))
    for tag, gpus, resume, folder in plan:
        run_dir = work / folder
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        r = run(tag, train_command(a, run_dir, model_dir, corpus, gpus, resume), log,
                min(240, deadline - time.time() - 10))
        res[tag] = summary(run_dir) if r["rc"] == 0 else None
        res[f"{tag}_process"] = r
        (out / "multi_gpu.json").write_text(json.dumps(res, indent=1))
    table(c, a, res)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-only":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(build(Path(sys.argv[2]), sys.argv[3])))
    else:
        main()
