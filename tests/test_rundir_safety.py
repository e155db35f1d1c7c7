"""A run directory is always one coherent run: resume, locking, long documents, context length,
one-line errors, Ctrl-C and checkpoint loading, each checked through the CLI on tiny models.

Test names carry the number of the item they cover (item8 ... item14) so a reader finds them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rawtune.cli import main
from rawtune.rundir import RunDir
from tiny import sentences

ROOT = Path(__file__).resolve().parents[1]


def _train_argv(out: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--dataset", str(corpus), "--model", str(model), "--preset", "quick",
            "--seq-len", "64", "--batch-size", "2", "--learning-rate", "0.003", *extra]


def _one_line_error(capsys) -> str:
    """The error line, which must end stderr and be whole (library progress bars may come before it)."""
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("rawtune: error: ") and "Traceback" not in err and err.count("rawtune: error") == 1, err
    return last


def _cli_process(argv: list[str]) -> subprocess.Popen:
    """``rawtune`` in a child process (this checkout's code), stdout and stderr merged, line by line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "rawtune", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> list[str]:
    """Read the child's output until a line holds ``text``; fail with what it printed otherwise."""
    seen: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    pytest.fail(f"never printed {text!r}; output:\n{''.join(seen)}")


# ---------------------------------------------------------------- item 8: resume


def test_item8_resume_keeps_stored_settings(tmp_path, capsys, tiny_llama_dir, tiny_qwen2_dir, tiny_corpus):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    out = tmp_path / "r"
    _stop_at(out, model, tiny_corpus, 2)  # stopped at step 2 of 4, as Ctrl-C or the app's Stop leaves it
    before = RunDir(out).load()
    assert before["train"]["steps"] == 2 and before["train"]["stopped_early"]
    # No flags but --resume: the stored model, seq_len and max_steps stay (nothing falls back to defaults).
    assert main(["train", "--out", str(out), "--resume"]) == 0
    after = RunDir(out).load()
    assert after["model"] == before["model"] and after["model"]["spec"] == str(model)
    assert after["settings"]["train"]["max_steps"] == 4 and after["settings"]["train"]["seq_len"] == 64
    assert after["train"]["resumed_from_step"] == 2 and after["train"]["steps"] == after["train"]["max_steps"] == 4
    capsys.readouterr()
    # A finished run has nothing to resume; an explicit --max-steps extends it from its checkpoint.
    assert main(["train", "--out", str(out), "--resume"]) == 1
    assert "pass a larger --max-steps" in _one_line_error(capsys)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6"]) == 0
    extended = RunDir(out).load()["train"]
    assert extended["resumed_from_step"] == 4 and extended["steps"] == 6
    capsys.readouterr()
    # A changed model or block length is refused in one line that names the flag and the fix.
    for flag, value in (("--model", str(tiny_qwen2_dir)), ("--seq-len", "32")):
        assert main(["train", "--out", str(out), "--resume", flag, value]) == 1
        err = _one_line_error(capsys)
        assert err.startswith(f"rawtune: error: {flag}:") and "another --out" in err
    # The same model folder with other tokenizer files: the packed token ids would mean something else.
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8"]) == 1
    assert "tokenizer files of" in _one_line_error(capsys)
    # The same holds for `rawtune run --config` with resume: true.
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(f"out: {out}\nresume: true\nmax_steps: 8\nmodel: {tiny_qwen2_dir}\n")
    assert main(["run", "--config", str(cfg)]) == 1
    assert _one_line_error(capsys).startswith("rawtune: error: --model:")
    assert RunDir(out).load()["model"] == before["model"]


def _stop_at(out: Path, model: Path, corpus: Path, step: int) -> None:
    """Train ``out`` afresh and stop it after ``step`` steps (adapter and checkpoint saved)."""
    import threading

    from rawtune.pipeline import run_pipeline
    from rawtune.settings import RunSettings, apply

    stop = threading.Event()
    values = dict(out=str(out), dataset=str(corpus), model=str(model), preset="quick", seq_len=64,
                  batch_size=2, max_steps=4, learning_rate=3e-3, save_steps=100, stages=["data", "train", "eval"])
    run_pipeline(apply(RunSettings(), values), log=lambda line: None, stop=stop,
                 callback=lambda e: stop.set() if e["type"] == "step" and e["step"] >= step else None)


# ---------------------------------------------------------------- item 9: lock


def test_item9_second_process_is_refused_and_stale_lock_does_not_block(tmp_path, capsys, tiny_llama_dir,
                                                                       tiny_corpus):
    out = tmp_path / "r"
    first = _cli_process(_train_argv(out, tiny_llama_dir, tiny_corpus, "--max-steps", "100000",
                                     "--save-steps", "100000"))
    try:
        _wait_for(first, "[train] step")
        started = time.time()
        assert main(_train_argv(out, tiny_llama_dir, tiny_corpus, "--max-steps", "2")) == 1
        assert time.time() - started < 5  # at once, not after waiting for the other run
        err = _one_line_error(capsys)
        assert f"another rawtune process (pid {first.pid})" in err and str(out) in err
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, the kernel's lock does not
        first.wait()
    assert (out / ".lock").is_file()
    assert main(_train_argv(out, tiny_llama_dir, tiny_corpus, "--max-steps", "2")) == 0
    assert RunDir(out).load()["train"]["steps"] == 2


# ---------------------------------------------------------------- item 10: one long document


def test_item10_single_one_line_text_file_trains_with_contiguous_heldout(tmp_path, capsys, tiny_llama_dir):
    from transformers import AutoTokenizer

    book = tmp_path / "dump.txt"
    text = " ".join(sentences(500, seed=3))
    book.write_text(text, encoding="utf-8")  # one line, one document
    out = tmp_path / "r"
    assert main(_train_argv(out, tiny_llama_dir, book, "--max-steps", "2")) == 0
    data = RunDir(out).load()["data"]
    assert data["documents_kept"] == 1 and data["documents_cut"] == 1
    assert data["train_blocks"] > 0 and data["heldout_blocks"] >= 4
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    train = np.load(out / "data" / "train.npy").reshape(-1)
    held = np.load(out / "data" / "heldout.npy").reshape(-1)
    # Training text is the head of the document, held-out text its tail: one cut, nothing interleaved.
    assert np.array_equal(train, ids[:len(train)]) and np.array_equal(held, ids[len(ids) - len(held):])
    assert len(train) + len(held) <= len(ids)
    # --piece-tokens 0 keeps documents whole (the old behaviour) and says how to fix it.
    capsys.readouterr()
    assert main(_train_argv(tmp_path / "whole", tiny_llama_dir, book, "--max-steps", "2",
                            "--piece-tokens", "0")) == 1
    assert "drop --piece-tokens 0" in _one_line_error(capsys)


# ---------------------------------------------------------------- item 11: context length


def test_item11_seq_len_beyond_model_context_is_refused(tmp_path, capsys, tiny_llama_dir, tiny_corpus):
    argv = _train_argv(tmp_path / "r", tiny_llama_dir, tiny_corpus, "--max-steps", "2")
    argv[argv.index("--seq-len") + 1] = "1024"  # the tiny model has max_position_embeddings 512
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "--seq-len 1024" in err and "512" in err and "max_position_embeddings" in err


# ---------------------------------------------------------------- item 12: one-line errors


def _gguf_file(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["yaml_model_number", "yaml_quant_number", "yaml_not_utf8", "config_only_folder",
                                  "garbage_gguf", "truncated_gguf", "truncated_run_json"])
def test_item12_bad_inputs_give_one_line_errors(case, tmp_path, capsys, tiny_llama_dir, tiny_corpus):
    cfg = tmp_path / "c.yaml"
    base = f"out: {tmp_path / 'r'}\ndataset: {tiny_corpus}\nseq_len: 64\nmax_steps: 1\npreset: quick\n"
    if case == "yaml_model_number":
        cfg.write_text(base + "model: 123\n")
        argv, expect = ["run", "--config", str(cfg)], "model '123'"
    elif case == "yaml_quant_number":
        cfg.write_text(base + f"model: {tiny_llama_dir}\nquant: 5\n")
        argv, expect = ["run", "--config", str(cfg)], "unknown quant type '5'"
    elif case == "yaml_not_utf8":
        cfg.write_bytes(base.encode() + b"name: caf\xe9\n")
        argv, expect = ["run", "--config", str(cfg)], "is not UTF-8 text (byte 0xe9"
    elif case == "config_only_folder":
        folder = tmp_path / "model"
        folder.mkdir()
        shutil.copy(tiny_llama_dir / "config.json", folder)
        argv, expect = _train_argv(tmp_path / "r", folder, tiny_corpus), "no weights (*.safetensors or *.bin)"
    elif case == "garbage_gguf":
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + os.urandom(300))
        argv, expect = _train_argv(tmp_path / "r", bad, tiny_corpus), "is not a readable GGUF file"
    elif case == "truncated_gguf":
        whole = _gguf_file(tmp_path / "whole.gguf").read_bytes()
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(whole[: len(whole) // 2])
        argv, expect = _train_argv(tmp_path / "r", cut, tiny_corpus), "is not a readable GGUF file"
    else:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "run.json").write_text('{"settings": {"out": "r", "train": {"mod')
        argv, expect = ["eval", str(tmp_path / "r")], "run.json is damaged (not valid JSON"
    assert main(argv) == 1
    assert expect in _one_line_error(capsys)


def test_item12_export_reads_a_truncated_gguf_with_a_clear_error(tmp_path):
    from rawtune.errors import ExportError
    from rawtune.export.steps import tensor_types

    whole = _gguf_file(tmp_path / "whole.gguf")
    assert tensor_types(whole) == {"F32": 1}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:100])
    with pytest.raises(ExportError, match="cut.gguf is not a readable GGUF file"):
        tensor_types(cut)


# Which file is written to a full disk: rawtune's F16 writer, llama.cpp's quantizer (its plain Q8_0
# goes to the work folder first, since Q8_0 is then re-rounded with error compensation), and the
# compensated file beside the others.
FULL_FILES = {"F16": "gguf_work/r.F16.gguf.partial", "Q8_0": "gguf_work/r.Q8_0.default.gguf.partial",
              "compensated Q8_0": "gguf/r.Q8_0.gguf.partial"}


@pytest.mark.parametrize("full", list(FULL_FILES))
def test_item12_disk_full_while_exporting_is_one_line_and_leaves_no_work_file(full, tmp_path, capsys,
                                                                               tiny_llama_dir, tiny_corpus):
    from conftest import train_tiny

    run = train_tiny(tmp_path / "r", tiny_llama_dir, tiny_corpus, max_steps=2)
    work = run.path / "gguf_work"
    work.mkdir()
    # The file being written is a link to /dev/full: every real write() to it fails with ENOSPC, as on
    # a full disk. The F16 work file, written in full before the later failures, must go too.
    partial = run.path / FULL_FILES[full]
    partial.parent.mkdir(exist_ok=True)
    partial.symlink_to("/dev/full")
    assert main(["export", str(run.path), "--quant", "q8_0"]) == 1
    err = _one_line_error(capsys)
    if full == "Q8_0":
        assert "could not quantize r.F16.gguf to Q8_0" in err, err
    else:
        assert "No space left on device" in err and "free disk space" in err, err
    assert not work.exists() or not list(work.iterdir())
    assert not list(run.gguf_dir.glob("*.partial")) and not list(run.gguf_dir.glob("*.gguf"))


# ---------------------------------------------------------------- item 13: Ctrl-C


def test_item13_ctrl_c_saves_and_exits_130(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "r"
    proc = _cli_process(_train_argv(out, tiny_llama_dir, tiny_corpus, "--max-steps", "100000",
                                    "--save-steps", "100000"))
    try:
        _wait_for(proc, "[train] step 2/")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "--resume" in rest
    run = RunDir(out)
    assert run.has_adapter() and list(run.checkpoints_dir.glob("checkpoint-*"))
    assert run.load()["train"]["stopped_early"]


# ---------------------------------------------------------------- item 14: checkpoint state


class _RunsCode:
    """Unpickling this object creates a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_item14_fastloop_state_loads_weights_only(tmp_path, tiny_llama_dir):
    import torch

    from rawtune.train import fast_loop as fastloop
    from rawtune.errors import TrainError
    from rawtune.settings import TrainSettings, resolve_preset
    from rawtune.train.hf_loop import load_peft
    from rawtune.train.optim import schedule

    t = resolve_preset(TrainSettings(model=str(tiny_llama_dir), preset="quick", seq_len=16, max_steps=3))
    t.embedding_learning_rate = t.learning_rate / 10
    run = RunDir(tmp_path / "r")

    def fresh():
        model = load_peft(t, str(tiny_llama_dir))
        optimizer = fastloop.make_optimizer(model, t)
        return model, optimizer, schedule(t, optimizer, 3)

    model, optimizer, scheduler = fresh()
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    path = fastloop.save_checkpoint(run, model, optimizer, scheduler, step=1)
    assert torch.load(path / fastloop.STATE_FILE, weights_only=True)["step"] == 1
    model2, optimizer2, scheduler2 = fresh()
    assert fastloop.load_checkpoint(path, model2, optimizer2, scheduler2) == 1
    assert scheduler2.last_epoch == 1 and optimizer2.state_dict()["state"]
    # A state file holding arbitrary objects is refused, and the code inside it never runs.
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "optimizer": _RunsCode(marker), "scheduler": {}}, path / fastloop.STATE_FILE)
    with pytest.raises(TrainError, match="not a plain optimizer state"):
        fastloop.load_checkpoint(path, model2, optimizer2, scheduler2)
    assert not marker.exists()
