"""The app itself on a GPU, end to end: ``app.py`` started as a user starts it, driven over its
HTTP API with ``gradio_client`` by two visitors at once.

Visitor A uploads a small corpus, trains a SmolLM2-135M-shaped model (random weights, the real
layer sizes) and stops it part way; meanwhile visitor B's training waits for the GPU and says so;
when A stops, B runs; A resumes from the checkpoint (waiting for B), then exports a Q8_0 GGUF and
compares base and tuned. Checked: the progress A's page streams (steps rising, then Stopped, then
Done), that B's page showed its place in line while A held the GPU, the checkpoint resume, the
export table and both Compare answers.

GPU only (``gpu`` marker). On the GPU machine it needs gradio and llama-cpp-python for Python 3.12
on PYTHONPATH (carried as packs: docs/benchmarks.md gives the commands, before "Training speed on one GPU").
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
gradio_client = pytest.importorskip("gradio_client")

from test_ui_browser import _form, data_form  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
A_STEPS = 400
WORDS = "river stone light water field morning keeper bridge lantern harbor boat mill".split()


def smollm2_shaped(path: Path) -> Path:
    """A llama with SmolLM2-135M's layer sizes (576 wide, 30 layers, 9/3 heads, tied), random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # A pad token of its own: Unsloth's loader refuses pad == eos on a model whose embedding it cannot
    # grow (seen on the GPU machine: "Could not find a valid pad token").
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(path / "tok"))
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = path / "smollm2-shaped"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def corpus(path: Path, documents: int = 400) -> Path:
    import random

    rng = random.Random(1)
    with path.open("w") as out:
        for i in range(documents):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(120))}) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    home = tmp_path_factory.mktemp("app_gpu")
    model = smollm2_shaped(home)
    port = _free_port()
    env = {**os.environ, "RAWTUNE_RUNS": str(home / "runs"), "RAWTUNE_DEFAULT_MODEL": str(model),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("SPACE_ID", "RAWTUNE_SHARED", "HF_TOKEN"):
        env.pop(name, None)
    log = home / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=home, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while True:
        try:
            gradio_client.Client(url, verbose=False, download_files=False)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"app.py did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
    yield type("App", (), {"url": url, "model": model, "home": home, "log": log})
    proc.terminate()
    proc.wait(timeout=60)
    print(log.read_text(errors="replace")[-4000:])


def _client(app):
    return gradio_client.Client(app.url, verbose=False, download_files=False)


def _step(status: str) -> int:
    found = re.findall(r"step \*\*(\d+)/", status)
    return int(found[-1]) if found else 0


def _wait(job, condition, timeout_s: float, what: str):
    """The job's newest streamed frame once ``condition(frame)`` holds."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        outputs = job.outputs()
        if outputs and condition(outputs[-1]):
            return outputs[-1]
        if job.done() and not (outputs and condition(outputs[-1])):
            raise AssertionError(f"{what}: the job ended first; last frame {outputs[-1] if outputs else None}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_app_trains_stops_resumes_exports_and_compares_on_gpu(app, tmp_path):
    text = corpus(tmp_path / "river.jsonl")
    a, b = _client(app), _client(app)
    for client in (a, b):
        summary = client.predict("", *data_form(upload=gradio_client.handle_file(str(text)), min_chars=0,
                                               model=str(app.model)).values(), api_name="/load_source")[0]
        assert "uploaded river.jsonl" in summary
    def form(steps: int) -> dict:
        return {**data_form(upload=gradio_client.handle_file(str(text)), min_chars=0, model=str(app.model)),
                **_form(seq_len=512, lora_r=16, max_steps=steps, save_steps=20, eval_steps=0, logging_steps=5,
                        learning_rate=0.001, batch_size=8, grad_accum=1)}

    started = time.time()
    # A's run is long enough that it is surely still training when B arrives and when Stop comes (an
    # H100 trains this shape at about 9 steps/s; step 25 came 42-47 s after the start, loading included).
    job_a = a.submit("", *form(A_STEPS).values(), api_name="/start_training")
    first = _wait(job_a, lambda f: _step(f[0]) >= 25, 420, "A's training to pass step 25")
    job_b = b.submit("", *form(100).values(), api_name="/start_training")
    waiting = _wait(job_b, lambda f: "in line" in f[0], 120, "B to show its place in the GPU line")
    print(f"A at step {_step(first[0])} after {time.time() - started:.0f} s; B sees: {waiting[0][:120]}")
    # Stop's outputs are the note and the Stop button; gradio_client returns only the note (a Button
    # has no API value), as a plain string. Seen on the H100: indexing it gave "*".
    assert "Stopping after the current step" in a.predict(api_name="/stop_training")
    stopped = job_a.result(timeout=300)
    assert stopped[0].startswith("Stopped") or "Stopped" in stopped[0], stopped[0]
    steps_a = [_step(f[0]) for f in job_a.outputs()]
    assert max(steps_a) >= 25 and steps_a == sorted(steps_a)  # progress only moves forward
    # A resumes from its checkpoint; it waits for B, whose training now holds the GPU.
    job_resume = a.submit("", api_name="/resume_training")
    done_b = job_b.result(timeout=600)
    assert "Done" in done_b[0], done_b[0]
    done_a = job_resume.result(timeout=600)
    assert "Done" in done_a[0] and "held-out perplexity" in done_a[3], done_a[0]
    assert any("in line" in f[0] for f in job_resume.outputs()), "A's resume never waited behind B"
    # The page keeps the newest 200 log lines, so the resume line is looked for in the early frames;
    # the steps streamed after it continue from the checkpoint instead of starting at 1.
    resumed = job_resume.outputs()
    assert any("[train] resuming from checkpoint-" in f[2] for f in resumed), "no resume line on A's page"
    resumed_steps = [_step(f[0]) for f in resumed if _step(f[0])]
    assert resumed_steps and min(resumed_steps) >= 20 and max(resumed_steps) == A_STEPS, resumed_steps[:5]
    # Export (Q8_0, verified in llama.cpp) and Compare, base and tuned side by side.
    exported = a.predict(["Q8_0"], "", api_name="/export_model")
    log, table = exported[0], exported[1]
    q8 = [row for row in table["data"] if row[0] == "Q8_0"]
    perplexity = table["headers"].index("perplexity (llama.cpp)")
    assert q8 and q8[0][perplexity] > 1 and "verification" in log, (table, log[-400:])
    answers = a.predict("river stone", "completion", "pytorch", 24, 0, 1.0, 3407, api_name="/run_compare")
    assert answers[0].strip() and answers[1].strip() and answers[0] != answers[1]
    print(f"whole app path on the GPU: {time.time() - started:.0f} s")
