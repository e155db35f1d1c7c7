"""The CLI contract: exit codes, one-line errors, YAML keys, and the run directory it writes."""

from __future__ import annotations

import json

import pytest

from rawtune.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "rawtune" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "missing.jsonl", "--out", "{tmp}/r"], "dataset missing.jsonl not found"),
    (["train", "--dataset", "{tmp}/c.docx", "--out", "{tmp}/r"], "unsupported file type"),
    (["train", "--dataset", "{tmp}/c.jsonl", "--out", "{tmp}/r", "--lora-r", "0"], "--lora-r: must be a whole number from 1 to 1024, not 0"),
    (["train", "--dataset", "{tmp}/c.jsonl", "--out", "{tmp}/r", "--preset", "huge"], "--preset 'huge' is unknown"),
    (["train", "--dataset", "{tmp}/c.jsonl", "--out", "{tmp}/r", "--text-column", "body"], "--text-column 'body' not found"),
    (["run", "--config", "{tmp}/bad.yaml"], "unknown {tmp}/bad.yaml: key 'max_step'; did you mean max_steps"),
    (["run", "--config", "{tmp}/bad2.yaml"], "key 'max_steps' (--max-steps) must be a number, not 'abc'"),
    (["eval", "{tmp}/not-a-run"], "is not a run directory"),
])
def test_bad_input_exits_1_with_one_line(tmp_path, capsys, tiny_llama_dir, argv, message):
    (tmp_path / "c.docx").write_bytes(b"PK")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello there, some text"}) + "\n")
    (tmp_path / "bad.yaml").write_text("max_step: 3\n")
    (tmp_path / "bad2.yaml").write_text("max_steps: abc\n")
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--model", str(tiny_llama_dir)] * (argv[0] == "train")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rawtune: error: ") and "\n" not in err and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err


def test_run_config_trains_and_merges(tmp_path, capsys, tiny_llama_dir, tiny_corpus):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"out: {tmp_path / 'run'}\nstages: [data, train, eval, merge]\ndataset: {tiny_corpus}\n"
                   f"model: {tiny_llama_dir}\npreset: quick\nseq_len: 64\nmax_steps: 3\n")
    assert main(["run", "--config", str(cfg), "--learning-rate", "0.002"]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["settings"]["train"]["learning_rate"] == 0.002
    assert {"ppl_base", "ppl_tuned", "train_tokens", "train_seconds", "train_tokens_per_s"} <= set(record["metrics"])
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert main(["merge", str(tmp_path / "run")]) == 0  # running a stage twice is safe
