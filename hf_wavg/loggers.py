"""The safety table and plot for the experiment trackers of ``report_to``: TensorBoard gets
the table as text (its text plugin renders markdown) and the plot as an image; Weights &
Biases a ``wandb.Table`` and a ``wandb.Image``. Once per safety evaluation, besides the
scalars that reach every logger through ``Trainer.log``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers.integrations import TensorBoardCallback, WandbCallback

from hf_wavg.safety_monitor import SafetyMonitor

TABLE_TAG = "safety/table"
PLOT_TAG = "safety/plot"


def publish_safety(callbacks: Iterable[Any], monitor: SafetyMonitor, step: int) -> None:
    """Send the table and plot of ``monitor``'s evaluation at ``step`` to every TensorBoard and
    W&B callback among ``callbacks`` that has started (a tracker that has not is skipped)."""
    trackers = [c for c in callbacks if (isinstance(c, TensorBoardCallback) and c.tb_writer is not None)
                or (isinstance(c, WandbCallback) and c._initialized)]
    if not trackers:
        return
    header, rows = monitor.headline_table(step)
    table = monitor.console_table(step)
    figure = monitor.figure()
    try:
        for tracker in trackers:
            if isinstance(tracker, TensorBoardCallback):
                tracker.tb_writer.add_text(TABLE_TAG, table, step)
                if figure is not None:
                    tracker.tb_writer.add_figure(PLOT_TAG, figure, step, close=False)
                tracker.tb_writer.flush()
            else:
                wandb = tracker._wandb
                logs: dict[str, Any] = {TABLE_TAG: wandb.Table(columns=header, data=rows), "train/global_step": step}
                if figure is not None:
                    logs[PLOT_TAG] = wandb.Image(figure)
                wandb.log(logs)
    finally:
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)
