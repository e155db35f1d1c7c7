"""Issue 25, items 3, 5, 7, 9 and 10: bombs, absurd numbers, half-written files and SIGTERM.

Each test is named after its item and runs the real reader, settings, training loops or CLI on
tiny models built here. Where a full disk is needed, no small real filesystem is available without
root (mounting one needs privileges a test must not assume), so the lowest-level write rawtune's
code reaches is patched to write part of its bytes and then raise ``OSError(ENOSPC)``: numpy's
``write_array`` for the data stage, transformers' ``TrainerState.save_to_json`` for a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny
from rawtune import settings as S
from rawtune.cli import main
from rawtune.errors import ConfigError, RawtuneError, TrainError
from rawtune.rundir import RunDir
from rawtune.settings import RunSettings, apply, train_from_form, validate

import rawtune

# The checkout whose rawtune these tests import (subprocesses run the same code).
REPO = Path(rawtune.__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    """``exc`` is rawtune's own one-line error, and the app shows it as such (not "Unexpected ...")."""
    assert isinstance(exc, RawtuneError), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert text and "\n" not in text
    try:
        from rawtune.ui.background import friendly
    except ImportError:  # the app's extra is not installed: the CLI's check is the one that counts
        return text
    shown = str(friendly(exc))
    assert not shown.startswith("Unexpected") and "Traceback" not in shown
    return text


def _cli_one_line(capsys, argv: list[str]) -> str:
    """Run the CLI: exit 1 and a single ``rawtune: error:`` line on stderr; that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rawtune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- item 3: Parquet dictionary bomb


DICTIONARY_BOMB = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
value = "a" * 1_000_000
rows = int(sys.argv[2])
# One 1 MB value in the dictionary, named by every row: the file stores the value once, the reader
# that decodes rows makes it `rows` times.
column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([value]))
pq.write_table(pa.table({"text": column}), sys.argv[1], compression="zstd", use_dictionary=True,
               dictionary_pagesize_limit=4 * 2**20)
"""

READ_AND_MEASURE = """
import json, sys
from rawtune.data import read_documents
from rawtune.settings import DataSettings
docs = read_documents(DataSettings(dataset=sys.argv[1]))
# VmHWM: this process's peak resident memory (ru_maxrss may carry the forking parent's peak).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"chars": sum(map(len, docs.texts)), "docs": len(docs.texts), "peak_mb": peak_kb / 1024,
                  "all_a": all(set(t) == {"a"} for t in docs.texts)}))
"""


def test_item3_parquet_dictionary_bomb_memory_bounded(tmp_path):
    """A few-KB dictionary-encoded file whose rows decode to 600 MB is read on a shared app with
    its memory bounded by what is decoded (the cap's share), not by the footer's small claim."""
    import pyarrow.parquet as pq

    bomb = tmp_path / "bomb.parquet"
    subprocess.run([sys.executable, "-c", DICTIONARY_BOMB, str(bomb), "600"], check=True)
    meta = pq.ParquetFile(bomb).metadata
    assert bomb.stat().st_size < 50_000
    assert "RLE_DICTIONARY" in meta.row_group(0).column(0).encodings  # really dictionary-encoded
    assert meta.row_group(0).total_byte_size < 5 * 2**20  # the footer claims a few MB; rows decode to 600 MB
    cap = 20_000_000  # a shared app's default character cap
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPACE_ID": "alice/rawtune", "RAWTUNE_MAX_CHARS": str(cap)}
    out = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(bomb)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["chars"] == cap and result["all_a"]  # the cap's worth, read right
    assert result["peak_mb"] < 250, result  # main's reader peaked far above (256-row batches of 1 MB rows)


def test_parquet_read_in_slices_keeps_every_row(tmp_path):
    """The sliced reader gives back every row and column of an ordinary file, nulls included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rawtune.data import read_documents
    from rawtune.settings import DataSettings

    texts = [f"document number {i} " + "word " * (i % 50) for i in range(3000)] + [None]
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": list(range(3001)), "text": texts}), path, row_group_size=1000)
    docs = read_documents(DataSettings(dataset=str(path)))
    assert docs.texts == [t or "" for t in texts] and docs.columns == ["id", "text"]


# ---------------------------------------------------------------- item 5: bounds and a non-finite loss


def test_item5_every_number_setting_has_finite_bounds():
    numbers = [(cls.__name__, f) for cls in (RunSettings, S.DataSettings, S.TrainSettings, S.ExportSettings,
                                             S.PushSettings) for f in S.settings_fields(cls)
               if f.metadata["kind"] in ("int", "float")]
    assert len(numbers) > 20
    for owner, f in numbers:
        bounds = f.metadata["bounds"]
        assert bounds is not None and np.isfinite([bounds.low, bounds.high]).all(), (owner, f.name)
    # Every preset's values and every default lie inside the declared bounds.
    for preset in S.PRESETS:
        validate(apply(RunSettings(), {"preset": preset}))


def test_item5_security_doc_lists_the_bounds():
    """docs/security.md's bounds table says what the declarations say, every number included."""
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    for cls in (S.DataSettings, S.TrainSettings, S.ExportSettings):
        for f in S.settings_fields(cls):
            if f.metadata["kind"] in ("int", "float"):
                assert f"| `{S.flag(f.name)}` | `{f.metadata['bounds']}` |" in text, f.name


@pytest.mark.parametrize("values,flag,range_text", [
    ({"lora_r": 1_000_000}, "--lora-r", "from 1 to 1024"),
    ({"epochs": float("inf")}, "--epochs", "above 0 and up to 1000"),
    ({"weight_decay": float("inf")}, "--weight-decay", "from 0 to 1"),
    ({"learning_rate": float("nan")}, "--learning-rate", "above 0 and below 1"),
    ({"seq_len": 10**9}, "--seq-len", "from 16 to 131072"),
    ({"eval_batches": -1}, "--eval-batches", "from 0 to 10000"),
    ({"max_documents": 0}, "--max-documents", "from 1 to 1000000000"),
    ({"imatrix_blocks": 10**9}, "--imatrix-blocks", "from 0 to 100000"),
])
def test_item5_out_of_range_values_refused_with_flag_and_range(values, flag, range_text):
    with pytest.raises(ConfigError) as caught:
        validate(apply(RunSettings(), values, origin="flag"))
    message = _one_line(caught.value)
    assert message.startswith(flag + ":") and range_text in message


def test_item5_bounds_hold_for_yaml_cli_and_form(tmp_path, capsys, tiny_llama_dir):
    # YAML: .inf is a float in YAML; main's validate let it through to an OverflowError in training.
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'r'}\ndataset: {tmp_path / 'missing.jsonl'}\nmodel: {tiny_llama_dir}\n"
                      "stages: [data, train]\nepochs: .inf\n")
    assert "--epochs: must be a number above 0 and up to 1000, not inf" in _cli_one_line(
        capsys, ["run", "--config", str(config)])
    # A flag: refused before anything is read (the dataset does not even exist).
    err = _cli_one_line(capsys, ["train", "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r"),
                                 "--model", str(tiny_llama_dir), "--weight-decay", "inf"])
    assert "--weight-decay: must be a number from 0 to 1, not inf" in err
    # The app's form: text boxes, inf included (main raised OverflowError turning "inf" into an int).
    for name, text in (("lora_r", "1e6"), ("epochs", "inf"), ("lora_r", "inf"), ("weight_decay", "1e300")):
        with pytest.raises(ConfigError) as caught:
            form = train_from_form("m", "quick", {name: text}, gpu=False)
            validate(RunSettings(train=form))
        assert _one_line(caught.value).startswith(S.flag(name) + ":")


def _nan_model(tmp_path, tiny_tokenizer_dir) -> Path:
    """A tiny llama whose final norm holds a NaN: every loss it computes is NaN."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import tiny_model

    path = tiny_model(tmp_path / "nan-model", tiny_tokenizer_dir, "llama", tie=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(path)
    return path


def test_item5_nan_loss_stops_trainer_loop_with_one_line(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    model = _nan_model(tmp_path, tiny_tokenizer_dir)
    with pytest.raises(TrainError) as caught:
        train_tiny(tmp_path / "r", model, tiny_corpus, max_steps=4, stages=["data", "train"])
    assert "the training loss became nan at step 1" in _one_line(caught.value)
    run = RunDir(tmp_path / "r")
    assert "train" not in run.load() and not run.has_adapter()  # no record saying "done", no adapter


def test_item5_nan_loss_stops_fast_loop_with_one_line(tmp_path, monkeypatch, tiny_tokenizer_dir, tiny_corpus):
    from rawtune.data import load_blocks
    from rawtune.train import fast_loop
    from rawtune.train.hf_loop import load_peft
    from rawtune.train.progress import Progress, StopSignal

    monkeypatch.setenv("RAWTUNE_COMPILE", "0")  # eager on the CPU: the loop's logic is what is tested
    model_dir = _nan_model(tmp_path, tiny_tokenizer_dir)
    run = train_tiny(tmp_path / "r", model_dir, tiny_corpus, stages=["data"])
    t = validate(apply(RunSettings(), dict(model=str(model_dir), preset="quick", seq_len=64, batch_size=2,
                                           max_steps=4, save_steps=100))).train
    model = load_peft(t, str(model_dir))
    lines: list[str] = []
    progress = Progress(t.batch_size * t.grad_accum * t.seq_len, None, lines.append)
    with pytest.raises(TrainError) as caught:
        fast_loop.fit(t, run, model, load_blocks(run, "train"), load_blocks(run, "heldout"), progress,
                      StopSignal(run, threading.Event(), lines.append), None)
    assert "the training loss became nan at step 1" in _one_line(caught.value)
    assert progress.losses() == []


# ---------------------------------------------------------------- item 7: Trainer checkpoints whole or absent


def test_item7_trainer_checkpoint_full_disk_leaves_no_half_checkpoint(tmp_path, monkeypatch, tiny_llama_dir,
                                                                      tiny_corpus):
    from transformers.trainer_callback import TrainerState

    from rawtune.train.progress import latest_checkpoint

    real_save = TrainerState.save_to_json

    def disk_full_at_step_4(self, json_path):
        if self.global_step < 4:
            return real_save(self, json_path)
        Path(json_path).write_text('{"global_step": ')  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(TrainerState, "save_to_json", disk_full_at_step_4)
    values = dict(max_steps=6, save_steps=2, stages=["data", "train"])
    with pytest.raises(TrainError) as caught:
        train_tiny(tmp_path / "r", tiny_llama_dir, tiny_corpus, **values)
    assert "writing checkpoint-4" in _one_line(caught.value) and "No space left on device" in str(caught.value)
    run = RunDir(tmp_path / "r")
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-2"]  # no half one, no hidden one
    assert (run.checkpoints_dir / "checkpoint-2" / "trainer_state.json").is_file()
    # A half checkpoint left by an older rawtune (written in place) is never what --resume picks.
    shutil.copytree(run.checkpoints_dir / "checkpoint-2", run.checkpoints_dir / "checkpoint-5")
    (run.checkpoints_dir / "checkpoint-5" / "trainer_state.json").unlink()
    assert latest_checkpoint(run).name == "checkpoint-2"
    monkeypatch.setattr(TrainerState, "save_to_json", real_save)
    train_tiny(tmp_path / "r", tiny_llama_dir, tiny_corpus, resume=True, **values)
    record = run.load()["train"]
    assert record["resumed_from_step"] == 2 and record["steps"] == 6 and not record["stopped_early"]


# ---------------------------------------------------------------- item 9: one line, not a traceback


def test_item9_deeply_nested_json_lines(tmp_path, capsys, tiny_llama_dir):
    from rawtune.data import read_documents
    from rawtune.settings import DataSettings

    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"text": "a fine first line of text"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RawtuneError) as caught:
        read_documents(DataSettings(dataset=str(nested)))
    assert "nested.jsonl, line 2: JSON nested too deeply" in _one_line(caught.value)
    array = tmp_path / "nested.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RawtuneError) as caught:
        read_documents(DataSettings(dataset=str(array)))
    assert "JSON nested too deeply" in _one_line(caught.value)
    err = _cli_one_line(capsys, ["data", "--dataset", str(nested), "--out", str(tmp_path / "r"),
                                 "--model", str(tiny_llama_dir)])
    assert "nested too deeply" in err


def test_item9_out_is_a_file(tmp_path, capsys, tiny_llama_dir, tiny_corpus):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    err = _cli_one_line(capsys, ["data", "--dataset", str(tiny_corpus), "--out", str(target),
                                 "--model", str(tiny_llama_dir)])
    assert f"the run directory {target} is a file, not a folder" in err
    assert target.read_text() == "not a folder"


def test_item9_out_unwritable(tmp_path, capsys, tiny_llama_dir, tiny_corpus):
    """A folder that cannot be made (under a file: ENOTDIR, for root too) and, where the tests do not
    run as root, one without write permission."""
    (tmp_path / "file").write_text("x")
    err = _cli_one_line(capsys, ["data", "--dataset", str(tiny_corpus), "--out", str(tmp_path / "file" / "run"),
                                 "--model", str(tiny_llama_dir)])
    assert "cannot write the run directory" in err and "Not a directory" in err
    if os.geteuid() != 0:  # root writes anywhere: permissions cannot make a folder unwritable for it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _cli_one_line(capsys, ["data", "--dataset", str(tiny_corpus), "--out", str(locked / "run"),
                                     "--model", str(tiny_llama_dir)])
        assert "cannot write the run directory" in err and "Permission denied" in err


def test_item9_full_disk_in_data_stage_leaves_no_npy(tmp_path, capsys, monkeypatch, tiny_llama_dir, tiny_corpus):
    """numpy's ``write_array`` (under ``np.save``) writes half the array's bytes, then raises ENOSPC."""
    import numpy.lib.format as npy_format

    real_write = npy_format.write_array
    calls = []

    def half_then_full(fp, array, *args, **kwargs):
        calls.append(array.shape)
        if len(calls) == 2:  # train.npy is written whole, heldout.npy finds the disk full
            fp.write(np.ascontiguousarray(array).tobytes()[: array.nbytes // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fp, array, *args, **kwargs)

    monkeypatch.setattr(npy_format, "write_array", half_then_full)
    out = tmp_path / "r"
    err = _cli_one_line(capsys, ["data", "--dataset", str(tiny_corpus), "--out", str(out), "--model",
                                 str(tiny_llama_dir), "--seq-len", "64"])
    assert len(calls) == 2 and "No space left on device" in err and "free disk space" in err
    assert sorted(p.name for p in (out / "data").iterdir()) == []  # no .npy, whole or cut, and no temp file
    assert "data" not in RunDir(out).load()


def _copy_of(trained_run, tmp_path) -> RunDir:
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns(".lock", "merged", "gguf*"))
    return RunDir(copy)


def test_item9_run_json_fields_of_wrong_type(tmp_path, capsys, trained_run):
    run = _copy_of(trained_run, tmp_path)
    record = run.load()
    for damage, said in [
        (lambda r: r["settings"]["train"].update(lora_r="abc"), "'lora_r' (--lora-r) must be a number"),
        (lambda r: r.update(settings=["not", "settings"]), "'settings' must be an object"),
        (lambda r: r["settings"].update(train=5), "'train' must be a JSON object"),
        (lambda r: r["model"].update(local_dir=5), "'model.local_dir' must be text"),
        (lambda r: r.update(train="done"), "'train' must be an object"),
    ]:
        broken = json.loads(json.dumps(record))
        damage(broken)
        run.run_file.write_text(json.dumps(broken))
        assert said in _cli_one_line(capsys, ["eval", str(run.path)]), said
        with pytest.raises(RawtuneError) as caught:  # the resume path reads the same record
            validate(S.from_dict(RunDir(run.path).load().get("settings", {})))
        _one_line(caught.value)


def test_item9_truncated_adapter(tmp_path, capsys, trained_run):
    from rawtune.streamed import read_adapter

    run = _copy_of(trained_run, tmp_path)
    weights = run.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _cli_one_line(capsys, ["eval", str(run.path)])
    assert "adapter_model.safetensors is damaged" in err and "cut off" in err
    with pytest.raises(RawtuneError) as caught:  # the export's streamed merge reads the same files
        read_adapter(run.adapter_dir)
    assert "cut off" in _one_line(caught.value)


def test_item9_broken_adapter_config(tmp_path, capsys, trained_run):
    from rawtune.streamed import read_adapter

    run = _copy_of(trained_run, tmp_path)
    config = run.adapter_dir / "adapter_config.json"
    for text in ('{"r": 16, "lora_alpha": ', '{"r": "sixteen", "lora_alpha": 16}', "[1, 2]"):
        config.write_text(text)
        assert "adapter_config.json is damaged" in _cli_one_line(capsys, ["eval", str(run.path)])
        with pytest.raises(RawtuneError) as caught:
            read_adapter(run.adapter_dir)
        _one_line(caught.value)


def test_item9_utf16_message_names_the_right_encoding(tmp_path):
    from rawtune.data import read_documents
    from rawtune.settings import DataSettings

    text = "Some text that a Windows editor saved.\n" * 20
    cases = {"bom.txt": (text.encode("utf-16"), "iconv -f UTF-16 -t UTF-8 bom.txt"),
             "le.jsonl": (json.dumps({"text": text}).encode("utf-16-le"), "iconv -f UTF-16LE -t UTF-8 le.jsonl"),
             "be.csv": (("text\n" + text).encode("utf-16-be"), "iconv -f UTF-16BE -t UTF-8 be.csv"),
             "cp1252.txt": (text.replace("a", "\xe9").encode("cp1252"), "file -i cp1252.txt")}
    for name, (data, hint) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RawtuneError) as caught:
            read_documents(DataSettings(dataset=str(tmp_path / name)))
        message = _one_line(caught.value)
        assert hint in message and "latin1" not in message, message
        if name == "cp1252.txt":
            assert "UTF-16" not in message


# ---------------------------------------------------------------- item 10: SIGTERM saves, then exit 143


def test_item10_sigterm_saves_checkpoint_and_exits_143(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "r"
    command = [sys.executable, "-m", "rawtune", "train", "--dataset", str(tiny_corpus), "--model",
               str(tiny_llama_dir), "--out", str(out), "--preset", "quick", "--seq-len", "64", "--batch-size", "2",
               "--max-steps", "5000", "--save-steps", "5000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "[train] step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    else:
        pytest.fail("training never reached step 3:\n" + "".join(lines[-20:]))
    rest, _ = proc.communicate(timeout=240)
    output = "".join(lines) + rest
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    run = RunDir(out)
    record = run.load()["train"]
    assert record["stopped_early"] and 3 <= record["steps"] < 5000
    assert run.has_adapter()
    checkpoint = run.checkpoints_dir / f"checkpoint-{record['steps']}"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert "ppl_tuned" not in run.load().get("metrics", {})  # the stages after training did not run
    assert "--resume" in rest


APP_LIKE = """
import sys, threading, time
from rawtune.pipeline import exit_on_sigterm, run_pipeline
from rawtune.settings import RunSettings, apply
exit_on_sigterm()  # what app.py installs once the server is up
values = dict(out=sys.argv[1], dataset=sys.argv[2], model=sys.argv[3], preset="quick", seq_len=64, batch_size=2,
              max_steps=5000, save_steps=5000, stages=["data", "train", "eval"])
# As in the app (pipeline.segment_events): the run goes on in a worker thread, with a stop event of its own.
threading.Thread(target=run_pipeline, args=(apply(RunSettings(), values),),
                 kwargs={"log": print, "stop": threading.Event()}, daemon=True).start()
while True:  # the server's main thread waits, as Gradio's block_thread does
    time.sleep(0.1)
"""


def test_item10_sigterm_in_the_app_saves_a_threads_training_and_exits_143(tmp_path, tiny_llama_dir, tiny_corpus):
    """The app trains in threads, where no Ctrl-C handler runs: SIGTERM (a Space being stopped)
    must still stop each training with its adapter and a checkpoint, before the process exits."""
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", APP_LIKE, str(out), str(tiny_corpus), str(tiny_llama_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "[train] step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail("training never reached step 3:\n" + "".join(lines[-20:]))
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, ("".join(lines) + rest)[-3000:]
    run = RunDir(out)
    record = run.load()["train"]
    assert record["stopped_early"] and run.has_adapter()
    assert (run.checkpoints_dir / f"checkpoint-{record['steps']}" / "trainer_state.json").is_file()
    assert "ppl_tuned" not in run.load().get("metrics", {})  # no stage started after the stop
