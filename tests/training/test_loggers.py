"""The safety table and plot reach the experiment trackers once per safety evaluation:
TensorBoard's event files, read back, hold the console's table as text and the plot as an
image at each evaluated step; W&B (not installed here) is checked against a recording
stand-in for the ``wandb`` module."""

from __future__ import annotations

from typing import Any

import pytest
from transformers.integrations import WandbCallback

from hf_wavg import SafetyConfig, WAvgConfig
from hf_wavg.loggers import PLOT_TAG, TABLE_TAG, publish_safety
from tests.trainer_helpers import SMALL_SAFETY, make_trainer, safety_texts

pytestmark = pytest.mark.slow


def test_tensorboard_gets_the_safety_table_and_plot_at_every_evaluation(tmp_path, minilm_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.text import metadata as text_metadata

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5.x's way to place it
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True),
                           eval_strategy="steps", eval_steps=3, max_steps=6, report_to=["tensorboard"],
                           safety_config=SafetyConfig(**SMALL_SAFETY), safety_dataset=safety_texts())
    trainer.train()
    monitor = trainer.safety_monitor
    steps = sorted({entry["step"] for entry in monitor.history})
    assert steps == [3, 6]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    texts = {event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors(f"{TABLE_TAG}/text_summary")}
    assert events.summary_metadata[f"{TABLE_TAG}/text_summary"].plugin_data.plugin_name == text_metadata.PLUGIN_NAME
    assert texts == {step: monitor.console_table(step) for step in steps}
    assert "| Counterfactual flip rate |" in texts[6]
    images = events.Images(PLOT_TAG)
    assert [image.step for image in images] == steps
    assert all(image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 for image in images)
    # The scalars still arrive as before, beside the table.
    assert any("safety/average/counterfactual/flip_rate" in tag for tag in events.Tags()["scalars"])


class RecordingWandb:
    """Stands in for the ``wandb`` module: records what is logged."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    class Table:
        def __init__(self, columns: list[str], data: list[list[str]]) -> None:
            self.columns, self.data = columns, data

    class Image:
        def __init__(self, figure: Any) -> None:
            self.figure = figure

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


def test_wandb_gets_a_table_of_the_headline_rows_and_an_image(tmp_path, minilm_path, monkeypatch):
    monkeypatch.setattr(WandbCallback, "__init__", lambda self: None)  # wandb itself is not installed
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True),
                           eval_strategy="steps", eval_steps=3, max_steps=3, report_to="none",
                           safety_config=SafetyConfig(**SMALL_SAFETY), safety_dataset=safety_texts())
    trainer.train()
    tracker = WandbCallback()
    tracker._wandb, tracker._initialized = RecordingWandb(), True
    unstarted = WandbCallback()
    unstarted._wandb, unstarted._initialized = RecordingWandb(), False
    publish_safety([tracker, unstarted], trainer.safety_monitor, 3)

    assert unstarted._wandb.logged == []
    (logged,) = tracker._wandb.logged
    header, rows = trainer.safety_monitor.headline_table(3)
    assert logged[TABLE_TAG].columns == header == ["metric", "average", "raw", "average − raw (95% paired interval)"]
    assert logged[TABLE_TAG].data == rows and len(rows) >= 3
    table_lines = trainer.safety_monitor.console_table(3).splitlines()
    assert all(f"| {' | '.join(row)} |" in table_lines for row in rows)  # the same cells as the console
    assert logged["train/global_step"] == 3
    assert logged[PLOT_TAG].figure is not None
