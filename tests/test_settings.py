"""Settings: every field's metadata (doc, kind, choices) drives the CLI, YAML and the app's form;
validate never changes what it was given; a form's text becomes settings with readable errors."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest

from rawtune import settings as S
from rawtune.cli import build_parser
from rawtune.errors import ConfigError
from rawtune.settings import (DataSettings, ExportSettings, PushSettings, RunSettings, TrainSettings, apply,
                              form_fields, to_dict, train_from_form, validate)

SECTION_CLASSES = [RunSettings, DataSettings, TrainSettings, ExportSettings, PushSettings]


def test_every_field_carries_doc_kind_and_choices():
    for cls in SECTION_CLASSES:
        for f in fields(cls):
            if f.name in S.SECTIONS:
                continue
            meta = f.metadata
            assert meta["doc"] and meta["kind"] in S.KINDS, (cls.__name__, f.name)
            default = f.default_factory() if f.default_factory is not S.dataclasses.MISSING else f.default
            if default is not None and meta["kind"] in ("int", "float", "bool"):
                assert isinstance(default, {"int": int, "float": float, "bool": bool}[meta["kind"]]), f.name
    assert S.choices("lr_scheduler") == ["cosine", "linear", "constant"]
    assert S.choices("quant") == S.QUANTS and S.choices("stages") == S.STAGES
    assert S.choices("preset") == ["auto", *S.PRESETS]
    # The reflection that read source comments and matched annotation strings is gone.
    assert not hasattr(S, "field_docs") and not hasattr(S, "coerce")
    import rawtune.cli as cli

    assert not hasattr(cli, "_parse_type")


def test_cli_flags_come_from_metadata(capsys):
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for cls in (DataSettings, TrainSettings):
        for f in fields(cls):
            action = actions[f.name]
            assert action.help == f.metadata["doc"]
            if f.metadata["kind"] == "bool":
                assert action.option_strings == [S.flag(f.name), "--no-" + S.flag(f.name)[2:]]
            else:
                assert action.type is {"int": int, "float": float, "str": str, "list": str}[f.metadata["kind"]]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for doc in S.docs(TrainSettings).values():
        assert " ".join(doc.split()) in shown


def test_yaml_values_are_read_by_kind():
    s = apply(RunSettings(), {"max_steps": 3.0, "learning_rate": "2e-4", "use_rslora": "yes", "quant": "q8_0",
                              "name": 2024, "stages": ["data", "train"], "dedupe": False})
    assert (s.train.max_steps, s.train.learning_rate, s.train.use_rslora) == (3, 2e-4, True)
    assert s.export.quant == "q8_0" and s.export.name == "2024" and s.stages == ["data", "train"]
    assert s.data.dedupe is False
    for key, value, message in [("max_steps", 2.5, "must be a number"), ("dedupe", "maybe", "true or false"),
                                ("name", {"a": 1}, "must be text"), ("quant", [{"x": 1}], "comma-separated list")]:
        with pytest.raises(ConfigError, match=message):
            apply(RunSettings(), {key: value})


def test_validate_returns_a_new_object_and_never_mutates():
    given = apply(RunSettings(), {"out": "r", "preset": "quick", "quant": "Q8_0,F16",
                                  "target_modules": "q_proj,embed_tokens", "stages": "DATA,train"})
    before = copy.deepcopy(to_dict(given))
    checked = validate(given)
    assert to_dict(given) == before
    assert checked is not given and all(getattr(checked, s) is not getattr(given, s) for s in S.SECTIONS)
    assert checked.export.quant == ["q8_0", "f16"] and given.export.quant == "Q8_0,F16"
    assert checked.stages == ["data", "train"] and checked.train.target_modules == ["q_proj"]
    assert checked.train.train_embeddings is True and given.train.train_embeddings is None
    assert checked.train.seq_len == S.PRESETS["quick"]["seq_len"] and given.train.seq_len is None
    checked.train.max_steps = 99  # the result is the caller's own: changing it leaves the input alone
    assert given.train.max_steps is None
    from rawtune.errors import ExportError

    with pytest.raises(ExportError, match="--quant: unknown quant type 'q5'; use some of iq4_xs, q4_k_m, q5_k_m, q6_k, q8_0, f16"):
        validate(apply(RunSettings(), {"quant": "q4_k_m,q5"}))  # the one --quant check (quants.labels_for)


def test_form_fields_map_to_settings():
    values = {f.name: "" for f in form_fields()}
    values.update(backend="auto", gradient_checkpointing="preset", lr_scheduler="preset", optimizer="auto",
                  use_rslora="preset", train_embeddings="off", target_modules=[], load_in_4bit=False,
                  seed=7, seq_len="64", learning_rate="1e-3", max_steps="12")
    t = train_from_form(" ./some/model ", "quick", values, gpu=False)
    assert (t.model, t.preset, t.seq_len, t.learning_rate, t.max_steps, t.seed) == ("./some/model", "quick", 64, 1e-3, 12, 7)
    # Empty boxes and "preset" keep the dataclass defaults, so the preset fills them later.
    assert t.lora_r is None and t.use_rslora is None and t.lr_scheduler is None and t.target_modules is None
    assert t.train_embeddings is False and t.eval_batches == 8 and t.logging_steps is None
    with pytest.raises(ConfigError, match="seq len must be a whole number"):
        train_from_form("m", "quick", {**values, "seq_len": "64.5"}, gpu=False)
    with pytest.raises(ConfigError, match="learning rate must be a number"):
        train_from_form("m", "quick", {**values, "learning_rate": "fast"}, gpu=False)


def test_auto_preset_rule():
    assert S.concrete_preset("auto", gpu=True) == "standard" and S.concrete_preset("auto", gpu=False) == "quick"
    assert S.concrete_preset(None, gpu=False) == "quick" and S.concrete_preset("thorough", gpu=False) == "thorough"
    assert train_from_form("", "auto", {}, gpu=True).preset == "standard"
    assert train_from_form("", "auto", {}, gpu=False).model == S.DEFAULT_MODEL


def test_data_form_values():
    d = S.from_form(DataSettings, {"dataset_config": " ", "split": "", "min_chars": 5.0, "max_documents": None,
                                   "dedupe": False, "text_column": None}, dataset="a/b")
    assert (d.dataset, d.dataset_config, d.split, d.min_chars, d.max_documents, d.dedupe, d.text_column) == (
        "a/b", None, "train", 5, None, False, None)
    with pytest.raises(ConfigError, match="unknown DataSettings field 'bogus'"):
        S.from_form(DataSettings, {"bogus": 1})
