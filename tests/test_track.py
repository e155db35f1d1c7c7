"""``--report-to trackio``: a tiny run through the real CLI logs to trackio's local store, and what
trackio holds afterwards is exactly what run.json says (losses per step, perplexities)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rawtune.cli import main
from rawtune.errors import ConfigError
from rawtune.settings import RunSettings, apply
from rawtune.track import check, final_metrics

pytest.importorskip("trackio")

READ_BACK = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps({"runs": SQLiteStorage.get_runs(sys.argv[1]), "logs": SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])}))
"""


def trackio_store(folder, project: str, run: str) -> dict:
    """What trackio's own reader finds in a local store (a fresh process: trackio reads TRACKIO_DIR at import)."""
    env = {**os.environ, "TRACKIO_DIR": str(folder)}
    done = subprocess.run([sys.executable, "-c", READ_BACK, project, run], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_run_logs_to_trackio_local_store(tmp_path, monkeypatch, capsys, tiny_llama_dir, tiny_corpus):
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    out = tmp_path / "tracked-run"
    assert main(["train", "--out", str(out), "--dataset", str(tiny_corpus),
                 "--model", str(tiny_llama_dir), "--preset", "quick", "--seq-len", "64", "--max-steps", "4",
                 "--eval-steps", "2", "--learning-rate", "0.003", "--report-to", "trackio"]) == 0
    assert "[track] logging to trackio: project rawtune, run tracked-run" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["tracking"] == {"report_to": "trackio", "project": "rawtune", "run": "tracked-run", "space": None}
    found = trackio_store(store, "rawtune", "tracked-run")
    assert found["runs"] == ["tracked-run"]
    logs = found["logs"]
    steps = [e for e in record["train"]["history"] if e["type"] == "step"]
    logged = {e["step"]: e for e in logs if "train/loss" in e}
    assert sorted(logged) == [e["step"] for e in steps] == [1, 2, 3, 4]
    for event in steps:
        assert logged[event["step"]]["train/loss"] == pytest.approx(event["loss"])
        assert logged[event["step"]]["train/lr"] == pytest.approx(event["lr"])
        assert logged[event["step"]]["train/tokens_per_s"] == pytest.approx(event["tokens_per_s"])
    evals = {e["step"]: e["eval_loss"] for e in record["train"]["history"] if e["type"] == "eval"}
    assert evals and {e["step"]: e["eval/loss"] for e in logs if "eval/loss" in e} == pytest.approx(evals)
    final = [e for e in logs if "final/ppl_tuned" in e]
    assert len(final) == 1
    assert final[0]["final/ppl_tuned"] == pytest.approx(record["metrics"]["ppl_tuned"])
    assert final[0]["final/ppl_base"] == pytest.approx(record["metrics"]["ppl_base"])


def test_final_metrics_carry_every_number_of_every_gguf_file():
    record = {"metrics": {"ppl_base": 17.3, "ppl_tuned": 15.4, "train_seconds": 9.0},
              "gguf": {"Q4_K_M": {"file": "x.Q4_K_M.gguf", "bytes": 1000, "ppl": 15.8, "ppl_increase_pct": 2.6,
                                  "tokenizer_ok": True, "kld_mean": float("nan")},
                       "Q8_0": {"ppl": 15.45, "tensor_types": {"q8_0": 3}}}}
    assert final_metrics(record) == {"final/ppl_base": 17.3, "final/ppl_tuned": 15.4, "gguf/Q4_K_M/bytes": 1000.0,
                                     "gguf/Q4_K_M/ppl": 15.8, "gguf/Q4_K_M/ppl_increase_pct": 2.6,
                                     "gguf/Q8_0/ppl": 15.45}


@pytest.mark.parametrize("values,token,message", [
    ({"report_to": "trackio", "trackio_space": "alice/tracks"}, False, "--trackio-space alice/tracks needs a Hugging Face token"),
    ({"report_to": "trackio", "trackio_space": "not a space"}, "hf_x", "--trackio-space 'not a space': give a Space id"),
    ({"trackio_space": "alice/tracks"}, "hf_x", "--trackio-space is only used with --report-to trackio"),
])
def test_tracking_settings_refused_before_any_stage(values, token, message):
    with pytest.raises(ConfigError) as exc:
        check(apply(RunSettings(), values), token)
    assert message in str(exc.value) and "hf_x" not in str(exc.value)


def test_unknown_tracker_names_the_flag(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--dataset", "x.jsonl", "--report-to", "wandb"]) == 1
    assert "--report-to" in capsys.readouterr().err


def test_the_app_logs_a_signed_in_visitor_to_a_space_of_their_own(hub_server):
    """The app's "Log to trackio" box: the visitor's own namespace, named from their token (never the
    owner's); without a token of their own it is refused in one line; unticked it is off."""
    from hub_emulator import BOB_TOKEN, WRITE_TOKEN

    from rawtune.track import space_for_app

    assert space_for_app(True, WRITE_TOKEN) == "alice/rawtune-trackio"
    assert space_for_app(True, BOB_TOKEN) == "bob/rawtune-trackio"
    assert space_for_app(False, WRITE_TOKEN) is None
    with pytest.raises(ConfigError) as exc:
        space_for_app(True, False)
    assert "needs your own Hugging Face token" in str(exc.value) and "\n" not in str(exc.value)
