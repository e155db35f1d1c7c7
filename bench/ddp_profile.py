"""Where a data-parallel step of the fast loop spends its time: 1 GPU against 2 (or ``--gpus N``),
with variants of the gradient all-reduce, read from CUDA events, host timers and the PyTorch profiler.

``bench/multi_gpu.py`` measures the scaling of the real command; this script says why it is what
it is. Each run is the real ``rawtune train`` command (``bench/multi_gpu.py``'s case, fewer steps),
started in one process or under torchrun, with three things added from outside the library:

- a CUDA event at the start of every optimizer step (no synchronisation, so the host still runs
  ahead as it does in training): the steady step time is the median gap between events;
- the host's time inside each step's forward and backward calls (``_train_step``). Nothing in
  them waits for the card, unless CUDA's launch queue is full: a host time close to the step time
  says the host, not the card, sets the pace;
- the PyTorch profiler over the last ``--profiled`` steps of rank 0: kernel time per kind
  (matmul, attention, NCCL, optimizer, other), the NCCL time that no compute kernel overlaps, and
  the time the card is idle.

Variants of the gradient sum (on ``--gpus`` GPUs, 2 by default), swapped in for rawtune's ``OverlappedReduce``:

- ``overlap``: rawtune's (buckets start during the last backward);
- ``after``: every bucket starts after backward (no overlap);
- ``none``: no gradient sum at all. Wrong training, kept only as the bound of what overlap could
  reach: two GPUs that share nothing.

On the GPU machine (2 GPUs; carry ``.device-bundle``)::

    (bench/multi_gpu.py's prefix); python bench/ddp_profile.py --work /tmp/multi_gpu --steps 20

It prints one table and writes ``ddp_profile.json`` and the per-run kernel tables to ``$OUT``.

On a CPU, ``--tiny`` runs the same driver on the tiny shape with 64-token blocks: one process, then
two under torchrun (gloo), through the real ``rawtune train`` command. Without CUDA the Trainer path
trains, so there are no CUDA events, no kernel profile and no fast-loop all-reduce variants: step
times are host gaps between progress events (a smoke test of the code, not a measurement)::

    PYTHONPATH=$PWD python bench/ddp_profile.py --tiny --work /tmp/ddp_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- inside one training process


def _variant_class(name: str):
    from rawtune.train import distributed

    class After(distributed.OverlappedReduce):
        def _ready(self, param):  # never during backward: finish() starts every bucket
            return None

    class Nothing(distributed.OverlappedReduce):
        def _launch(self, until, only_full):
            return None

    return {"overlap": distributed.OverlappedReduce, "after": After, "none": Nothing}[name]


def _kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if any(k in n for k in ("gemm", "cutlass", "sm90", "sm80", "xmma", "matmul", "nvjet", "cublas")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    return "other"


def _union(intervals: list) -> list:
    out: list = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(intervals: list) -> float:
    return sum(e - s for s, e in intervals)


def _minus(a: list, b: list) -> float:
    """Length of the union ``a`` not covered by the union ``b`` (both sorted, disjoint)."""
    total, j = 0.0, 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                total += b[k][0] - cur
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            total += e - cur
    return total


def _trace_summary(trace_file: Path, steps: int) -> dict:
    """Per-step milliseconds of kernel time by kind, NCCL time not under compute, and idle card time."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {}
    by_kind: dict = {}
    spans: dict = {"nccl": [], "compute": []}
    for e in kernels:
        k = _kind(e["name"])
        by_kind[k] = by_kind.get(k, 0.0) + e["dur"]
        spans["nccl" if k == "nccl" else "compute"].append((e["ts"], e["ts"] + e["dur"]))
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    compute, nccl = _union(spans["compute"]), _union(spans["nccl"])
    busy = _union(spans["compute"] + spans["nccl"])
    per = 1000.0 * max(steps, 1)
    return {"window_ms": round((end - start) / per, 2),
            "kernel_ms": {k: round(v / per, 2) for k, v in sorted(by_kind.items())},
            "compute_busy_ms": round(_length(compute) / per, 2),
            "nccl_busy_ms": round(_length(nccl) / per, 2),
            "nccl_alone_ms": round(_minus(nccl, compute) / per, 2),
            "idle_ms": round(((end - start) - _length(busy)) / per, 2)}


def parse_variant(text: str) -> tuple[str, int | None, dict]:
    """``name[@MB][+NAME=VALUE...]``: the all-reduce, its bucket size in MiB, environment for the run."""
    head, *env = text.split("+")
    name, _, mb = head.partition("@")
    return name, int(mb) if mb else None, dict(e.split("=", 1) for e in env)


def tag(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def worker(variant: str, profiled: int, out: Path, train_args: list[str]) -> int:
    """One training process: rawtune's CLI with the chosen all-reduce, step events and a profile."""
    import torch

    from rawtune import cli
    from rawtune.train import distributed, fast_loop

    name, mb, _env = parse_variant(variant)  # the driver already set the environment
    if not torch.cuda.is_available():
        return _cpu_worker(variant, out, train_args)
    fast_loop.OverlappedReduce = _variant_class(name)
    if mb:
        distributed.BUCKET_BYTES = mb * 2**20
    variant = tag(variant)
    rank = int(os.environ.get("RANK", "0") or 0)
    steps = int(train_args[train_args.index("--max-steps") + 1])
    marks: list = []
    host: list = []  # host milliseconds spent in each step's forward/backward calls
    world = os.environ.get("WORLD_SIZE", "1")
    result: dict = {"variant": variant, "rank": rank}

    def summarise(prof) -> None:
        trace = Path(f"/tmp/ddp_profile_trace_{variant}_{os.getpid()}.json")
        prof.export_chrome_trace(str(trace))
        result["profile"] = _trace_summary(trace, profiled)
        (out / f"kernels-{variant}-{world}gpu.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))

    # steps - profiled - 2: one warm-up step, then `profiled` whole steps; the last step unprofiled
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA],
                                  schedule=torch.profiler.schedule(wait=0, warmup=1, active=profiled, repeat=1),
                                  on_trace_ready=summarise)
    first = steps - profiled - 2
    original = fast_loop._train_step

    def timed(*args, **kwargs):
        if rank == 0 and len(marks) == first:
            prof.start()
        elif rank == 0 and first < len(marks) <= first + profiled + 1:
            prof.step()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append(event)
        began = time.perf_counter()
        out = original(*args, **kwargs)
        host.append(1000 * (time.perf_counter() - began))  # queueing forward and backward (no sync inside)
        return out

    fast_loop._train_step = timed
    code = cli.main(train_args)
    torch.cuda.synchronize()
    if rank == 0:
        prof.stop()
    gaps = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    result.update(code=code, step_ms=[round(g, 2) for g in gaps], host_ms=[round(h, 2) for h in host])
    world = os.environ.get("WORLD_SIZE", "1")
    (out / f"steps-{variant}-{world}gpu-rank{rank}.json").write_text(json.dumps(result))
    return code


def _cpu_worker(variant: str, out: Path, train_args: list[str]) -> int:
    """--tiny without CUDA: the CLI's training with host stamps at every progress event (each step)."""
    from rawtune import cli
    from rawtune.train import progress

    stamps: list = []
    original = progress.Progress.step

    def stamped(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)

    progress.Progress.step = stamped
    code = cli.main(train_args)
    rank, world = int(os.environ.get("RANK", "0") or 0), os.environ.get("WORLD_SIZE", "1")
    gaps = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
    result = {"variant": tag(variant), "rank": rank, "code": code, "step_ms": [round(g, 2) for g in gaps], "host_ms": []}
    (out / f"steps-{tag(variant)}-{world}gpu-rank{rank}.json").write_text(json.dumps(result))
    return code


# ---------------------------------------------------------------- the driver


def steady(step_ms: list, skip: int) -> float:
    """Median step time after the first ``skip`` steps (compiling, first collectives)."""
    rest = step_ms[skip:] or step_ms
    return statistics.median(rest) if rest else float("nan")


def main() -> None:
    from multi_gpu import build, card, run, train_command
    from tiny import write_corpus

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/multi_gpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profiled", type=int, default=3, help="last steps profiled on rank 0")
    p.add_argument("--variants", default="overlap,none,after",
                   help="comma-separated name[@bucket MiB][+ENV=VALUE...], e.g. overlap@16+NCCL_MAX_NCHANNELS=8")
    p.add_argument("--budget", type=float, default=540)
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel runs (against 1)")
    p.add_argument("--runs", default="", help="instead of --gpus/--variants: comma-separated GPUS:VARIANT, e.g. "
                   "1:overlap,2:overlap,1:overlap+RAWTUNE_COMPILE_MODE=reduce-overhead,2:overlap+RAWTUNE_COMPILE_MODE=reduce-overhead; "
                   "each speed-up is against the 1-GPU run with the same environment")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, 1 and 2 CPU processes")
    a = p.parse_args()
    if a.tiny:
        a.steps, a.profiled, a.gpus, a.variants, a.runs = min(a.steps, 6), 0, 2, "overlap", ""
        print("--tiny on a CPU: the Trainer path trains (no CUDA events, kernel profile or all-reduce "
              "variants); step times are host gaps between progress events", flush=True)
    deadline = time.time() + a.budget
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ.get("OUT") or work)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
                        ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        os.environ.setdefault(name, value)
    model_dir = work / ("tiny-shape" if a.tiny else "smollm2-135m-shape")
    if not (model_dir / "built.json").is_file():
        build(model_dir, "tiny" if a.tiny else "135m")
    corpus = write_corpus(work / "corpus.jsonl", documents=300 if a.tiny else 9000, seed=0)
    case = argparse.Namespace(tiny=a.tiny, seq=64 if a.tiny else 2048, micro=2 if a.tiny else 16, accum=2,
                              steps=a.steps, save_at=a.steps)
    log = out / "ddp_profile.log"
    log.write_text("")
    c = card()
    print(f"card: {c}", flush=True)
    rows = []
    runs = [(int(n), v) for n, v in (item.split(":", 1) for item in a.runs.split(","))] if a.runs else \
        [(1, "overlap")] + [(a.gpus, v) for v in a.variants.split(",")]
    for gpus, variant in runs:
        run_dir = work / f"profile-{gpus}-{variant}"
        args = train_command(case, run_dir, model_dir, corpus, 1, False)[3:]  # after "python -m rawtune.cli"
        env = parse_variant(variant)[2]
        os.environ.update(env)
        me = [__file__, "--worker", variant, str(a.profiled), str(out), *args]
        cmd = [sys.executable, *me] if gpus == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *me]
        r = run(f"{gpus} GPU(s), {variant}", cmd, log, min(200, deadline - time.time() - 5))
        for key in env:
            os.environ.pop(key, None)
        ranks = [json.loads(f.read_text()) for f in sorted(out.glob(f"steps-{tag(variant)}-{gpus}gpu-rank*.json"))]
        if r["rc"] != 0 or not ranks:
            rows.append({"gpus": gpus, "variant": variant, "failed": r["rc"]})
            continue
        unprofiled = a.steps - a.profiled - 2  # the steps before the profiler's warm-up
        per_rank = [steady(x["step_ms"][:unprofiled], 1 if a.tiny else 3) for x in ranks]
        rows.append({"gpus": gpus, "variant": variant, "step_ms": round(max(per_rank), 2),
                     "per_rank_step_ms": [round(ms, 2) for ms in per_rank],
                     "host_ms": round(steady(ranks[0]["host_ms"][:unprofiled], 3), 2) if ranks[0]["host_ms"] else None,
                     "profile": ranks[0].get("profile", {})})
    transports = sorted({line.split("NCCL INFO", 1)[1].strip() for line in log.read_text().splitlines()
                         if "NCCL INFO" in line and (" via " in line or "Connected all" in line)})[:12]
    print("NCCL transport lines (runs with NCCL_DEBUG=INFO):", *transports, sep="\n  ")
    (out / "ddp_profile.json").write_text(json.dumps({"card": c, "rows": rows}, indent=1))
    ones = [r for r in rows if r["gpus"] == 1 and "step_ms" in r]

    def base(r: dict) -> float:
        """The 1-GPU step with the same environment (e.g. the same compile mode), else the first."""
        same = [o for o in ones if parse_variant(o["variant"])[2] == parse_variant(r["variant"])[2]]
        return (same or ones or [{"step_ms": float("nan")}])[0]["step_ms"]

    print(f"\ncard: {c}; {case.micro * case.accum} blocks x {case.seq} tokens a step; steady step = median gap between step starts\n")
    print("| GPUs | all-reduce | step ms (each rank) | speed-up | host ms queueing forward/backward (rank 0) | "
          "kernel ms per step by kind | NCCL ms not under compute | idle ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" not in r:
            print(f"| {r['gpus']} | {r['variant']} | failed ({r['failed']}) | | | | | |")
            continue
        pr = r["profile"]
        print(f"| {r['gpus']} | {r['variant']} | {r['step_ms']} ({', '.join(map(str, r['per_rank_step_ms']))}) | "
              f"{base(r) / r['step_ms']:.3f}x | {r['host_ms']} | {pr.get('kernel_ms')} | {pr.get('nccl_alone_ms')} | {pr.get('idle_ms')} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:]))
    main()
