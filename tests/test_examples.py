"""The example launch configs parse as Accelerate configs of their kind, and the example
script fine-tunes under ``accelerate launch`` with two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from transformers import AutoModelForSequenceClassification

from tests.distributed.ports import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", None),
    "multi_node.yaml": ("MULTI_GPU", None),
    "fsdp2.yaml": ("FSDP", 2),
    "fsdp1.yaml": ("FSDP", 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_configs_are_valid_accelerate_configs(name):
    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    kind, level = EXPECTED[name]
    assert config.distributed_type.value == kind
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == level
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        if level == 1:
            assert config.fsdp_config["fsdp_use_orig_params"] is True  # hf_wavg needs it under FSDP1
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == level
        if level == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    assert sorted(p.name for p in (EXAMPLES / "accelerate").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["wavg", "callback"])
def test_example_script_trains_and_saves_the_average_under_accelerate_launch(tmp_path, trainer):
    """The README's CPU launch, for WAvgTrainer and for a plain Trainer with WAvgCallback: the
    script has no barrier or teardown of its own, and the launch must exit 0 with no abort
    (ranks leaving gloo one by one used to abort one of them now and then)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(EXAMPLES / "train_text_classifier.py"),
               "--output_dir", str(tmp_path), "--max_steps", "4", "--per_device_train_batch_size", "4",
               "--report_to", "none", "--method", "swa", "--eval_strategy", "steps", "--eval_steps", "2",
               "--save_steps", "2", "--trainer", trainer]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "terminate called" not in done.stderr
    AutoModelForSequenceClassification.from_pretrained(tmp_path)  # the averaged model reloads
    if trainer == "wavg":
        summary = json.loads((tmp_path / "wavg_averaging.json").read_text())
        assert summary["averager"]["method"] == "swa" and summary["averager"]["num_updates"] == 4
        assert summary["averager"]["num_elements_per_process"] < summary["averager"]["num_elements"]  # sharded
