"""WAvgConfig validation and parsing."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import HfArgumentParser, TrainerControl, TrainerState, TrainingArguments

from hf_wavg import EMA, LAWA, SWA, WAvgCallback, WAvgConfig
from tests.models import TiedLM


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("method", "median", "one of ema, swa, lawa, bema, posthoc_ema"),
        ("ema_decay", 1.0, r"in the open interval \(0, 1\) or None"),
        ("ema_decay", 0.0, r"in the open interval \(0, 1\) or None"),
        ("horizon", 0.0, r"in \(0, 1\] or None"),
        ("horizon", 1.5, r"in \(0, 1\] or None"),
        ("ema_schedule", "cosine", "one of constant, rational, power, mean"),
        ("ema_power", 0.0, "> 0"),
        ("ema_gamma", -1.0, "> 0"),
        ("ema_gamma", float("inf"), "a finite number"),
        ("ema_power", float("inf"), "a finite number"),
        ("bema_lag", float("inf"), "a finite number"),
        ("ema_decay", float("nan"), "a finite number"),
        ("lawa_k", 0, "an integer >= 1"),
        ("update_every", 0, "an integer >= 1"),
        ("update_every", 2.5, "an integer >= 1"),
        ("start_step", -1, "an integer >= 0"),
        ("start_fraction", 1.0, r"in \[0, 1\) or None"),
        ("average_parameters", "frozen", "one of trainable, all"),
        ("average_buffers", "sum", "one of copy, average"),
        ("refine_every_epochs", -2, "an integer >= 0"),
        ("batchnorm_batches", 0, "an integer >= 1"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"WAvgConfig\.{field} must be {allowed}; got"):
        WAvgConfig(**{field: value})


def test_bad_regex_is_reported():
    with pytest.raises(ValueError, match="average_name_regex is not a valid regular expression"):
        WAvgConfig(average_name_regex="(")


def test_parsed_with_training_arguments_from_cli_json_and_yaml(tmp_path):
    parser = HfArgumentParser((TrainingArguments, WAvgConfig))
    _, from_cli = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "lawa", "--lawa_k", "3", "--evaluate_raw", "true"]
    )
    assert (from_cli.method, from_cli.lawa_k, from_cli.evaluate_raw) == ("lawa", 3, True)

    settings = {"output_dir": str(tmp_path), "method": "swa", "start_fraction": 0.25}
    (tmp_path / "args.json").write_text(json.dumps(settings))
    _, from_json = parser.parse_json_file(str(tmp_path / "args.json"))
    (tmp_path / "args.yaml").write_text("output_dir: x\nmethod: ema\nema_decay: 0.95\nema_schedule: power\n")
    _, from_yaml = parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    assert (from_json.method, from_json.start_fraction) == ("swa", 0.25)
    assert (from_yaml.ema_decay, from_yaml.ema_schedule) == (0.95, "power")
    with pytest.raises(ValueError, match="WAvgConfig.ema_decay"):
        (tmp_path / "bad.yaml").write_text("output_dir: x\nema_decay: 2\n")
        parser.parse_yaml_file(str(tmp_path / "bad.yaml"))


def test_builds_the_configured_strategy():
    assert isinstance(WAvgConfig().resolved(100).build_strategy(), EMA)
    with pytest.raises(ValueError, match="set from the run's length: call resolved"):
        WAvgConfig().build_strategy()
    assert isinstance(WAvgConfig(method="swa").build_strategy(), SWA)
    lawa = WAvgConfig(method="lawa", lawa_k=4).build_strategy()
    assert isinstance(lawa, LAWA) and lawa.k == 4
    assert WAvgConfig(start_fraction=0.5).start_at(100) == 50 and WAvgConfig(start_step=7).start_at(100) == 7


def test_refining_from_the_average_is_refused_under_deepspeed(monkeypatch, tmp_path):
    args = TrainingArguments(str(tmp_path), report_to="none")
    callback = WAvgCallback(WAvgConfig(refine_every_epochs=1))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="refine_every_epochs is not supported under DeepSpeed"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=TiedLM())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=TiedLM())
    assert callback.averager is not None


@pytest.mark.parametrize(
    ("settings", "field", "allowed"),
    [
        ({"load_average_at_end": "false"}, "load_average_at_end", "true or false"),
        ({"evaluate_raw": 1}, "evaluate_raw", "true or false"),
        ({"ema_decay": "9e-1"}, "ema_decay", "a number"),
        ({"horizon": "0.2"}, "horizon", "a number"),
        ({"lawa_k": "5"}, "lawa_k", "an integer >= 1"),
        ({"average_name_regex": 3}, "average_name_regex", "a string"),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_the_field(settings, field, allowed):
    with pytest.raises(ValueError, match=rf"WAvgConfig\.{field} must be {allowed}"):
        WAvgConfig(**settings)


def test_strings_from_json_and_yaml_are_not_taken_for_booleans_or_numbers(tmp_path):
    parser = HfArgumentParser((TrainingArguments, WAvgConfig))
    (tmp_path / "args.json").write_text(json.dumps({"output_dir": "x", "load_average_at_end": "false"}))
    with pytest.raises(ValueError, match="WAvgConfig.load_average_at_end must be true or false"):
        parser.parse_json_file(str(tmp_path / "args.json"))
    (tmp_path / "args.yaml").write_text("output_dir: x\nema_decay: 9e-1\n")  # PyYAML: the string '9e-1'
    with pytest.raises(ValueError, match="WAvgConfig.ema_decay must be a number"):
        parser.parse_yaml_file(str(tmp_path / "args.yaml"))


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        ({"method": "lawa", "ema_decay": 0.9}, "ema_decay is set but method='lawa' does not use it"),
        ({"method": "swa", "lawa_k": 3}, "lawa_k is set but method='swa'"),
        ({"start_fraction": 0.5, "start_step": 10}, "start_fraction overrides start_step=10"),
        ({"batchnorm_batches": 4}, "batchnorm_batches is set but recompute_batchnorm is False"),
        ({"evaluate_raw": True, "evaluate_average": False}, "evaluate_raw does nothing"),
    ],
)
def test_settings_that_do_nothing_are_warned_about(settings, warning, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_wavg.config"):
        WAvgConfig(**settings)
    assert any(warning in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wavg.config"):
        WAvgConfig()
    assert not caplog.records


def test_the_horizon_help_is_written_from_the_registry():
    from dataclasses import fields

    from hf_wavg.averaging.methods import METHODS

    help_text = next(f.metadata["help"] for f in fields(WAvgConfig) if f.name == "horizon")
    for method in METHODS.values():
        if method.horizon_sets:
            assert method.horizon_meaning and f"{method.name}, {method.horizon_meaning}" in help_text, method.name
        else:
            assert f"{method.name}," not in help_text, method.name
