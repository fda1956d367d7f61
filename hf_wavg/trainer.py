"""``WAvgTrainer``: a drop-in ``Trainer`` whose evaluations, saves and Hub pushes use the
averaged weights, while training itself continues from the raw ones."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from huggingface_hub import ModelCard
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints
from transformers.utils.notebook import NotebookProgressCallback

from hf_wavg.averager import WeightAverager
from hf_wavg.batchnorm import recomputed_batchnorm
from hf_wavg.callback import WAvgCallback, saved_trainer_state
from hf_wavg.card_results import add_eval_results
from hf_wavg.config import WAvgConfig
from hf_wavg.loggers import publish_safety
from hf_wavg.model_card import PLOT_MARKDOWN, averaging_card_section
from hf_wavg.records import AVERAGING_FILE, SAFETY_PLOT_FILE
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.logit_pairing import logit_pairing_penalty
from hf_wavg.safety_monitor import SafetyMonitor
from hf_wavg.state_io import has_state

logger = logging.getLogger(__name__)
CONSOLE_CALLBACKS = (PrinterCallback, ProgressCallback, NotebookProgressCallback)


class WAvgTrainer(Trainer):
    """``transformers.Trainer`` with weight averaging.

    Takes every ``Trainer`` argument, plus ``wavg_config`` (:class:`WAvgConfig`). Differences
    from ``Trainer``:

    - ``evaluate()`` reports the average's metrics under the usual prefix (so
      ``metric_for_best_model``, ``load_best_model_at_end`` and early stopping act on the
      average); with ``evaluate_raw`` the raw weights are also reported, as ``eval_raw_*``;
    - ``predict()`` uses the average too (``predict_average=False``: the raw weights);
    - ``save_model()`` and ``push_to_hub()`` write the averaged weights, and the model card
      says how they were averaged; checkpoints keep the raw weights (training resumes from
      them) plus the averager state. Until a snapshot has been folded in there is no
      average: evaluations, predictions and saves then use the raw weights, with a warning,
      and the saved record and card say so. Weights holding NaN or inf are not saved;
    - with ``safety_config`` (:class:`SafetyConfig`), every evaluation also runs the safety
      suite on the averaged (and, with ``evaluate_raw``, raw) weights: ``safety/*`` metrics
      in the log, ``safety_report.json`` and ``safety_metrics.png`` in the output folder, a
      table in the model card; ``safety_dataset`` (default: the evaluation dataset) gives
      its texts. ``safety_logit_pairing_weight`` adds the counterfactual logit pairing
      penalty to the training loss.
    """

    def __init__(
        self,
        *args: Any,
        wavg_config: WAvgConfig | None = None,
        safety_config: SafetyConfig | None = None,
        safety_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.wavg_config = wavg_config or WAvgConfig()
        self.safety_config = safety_config
        self.wavg_callback = WAvgCallback(
            self.wavg_config,
            safety_config=safety_config,
            safety_dataset=safety_dataset if safety_dataset is not None else self.eval_dataset,
            tokenizer=self.processing_class,
        )
        self.wavg_callback.log_fn = self.log_to_integrations
        self.wavg_callback.publish_fn = lambda monitor, step: publish_safety(self.callback_handler.callbacks, monitor, step)
        self.add_callback(self.wavg_callback)
        self._saving_checkpoint = False
        self._unaveraged_warned_at: tuple[int, str] | None = None
        self._pairing_rng = random.Random(safety_config.safety_seed if safety_config else 0)

    def log_to_integrations(self, logs: dict[str, float]) -> None:
        """``Trainer.log`` without the console printers: the safety suite's many keys reach
        ``log_history`` and every ``report_to`` logger, while the console gets its table."""
        entry = {**logs, "step": self.state.global_step}
        if self.state.epoch is not None:
            entry["epoch"] = self.state.epoch
        self.state.log_history.append(entry)
        for callback in self.callback_handler.callbacks:
            if not isinstance(callback, CONSOLE_CALLBACKS):
                callback.on_log(self.args, self.state, self.control, logs=logs, model=self.model,
                                processing_class=self.processing_class)

    @property
    def safety_monitor(self) -> SafetyMonitor | None:
        return self.wavg_callback.safety_monitor

    @property
    def averager(self) -> WeightAverager | None:
        return self.wavg_callback.averager

    def _average_ready(self) -> bool:
        return self.averager is not None and self.averager.has_average

    def _average_swapped_in(self) -> bool:
        return self.averager is not None and self.averager.is_swapped_in

    @contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The model with the average swapped in (and BatchNorm statistics recomputed for it
        when configured); the raw weights come back bit for bit afterwards."""
        recompute = self.wavg_config.recompute_batchnorm and not self._average_swapped_in()
        with self.wavg_callback.averaged_weights() as model:
            context = recomputed_batchnorm(model, self._training_batches(), self.wavg_config.batchnorm_batches) \
                if recompute else nullcontext()
            with context:
                yield model

    def _training_batches(self) -> Iterator[dict[str, Any]]:
        for batch in self.get_train_dataloader():
            yield self._prepare_inputs(batch)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_resumable_checkpoint()
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        self.wavg_callback.resume_from_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def _last_resumable_checkpoint(self) -> str | None:
        """The newest complete checkpoint: its trainer state (which the Trainer writes last)
        readable and, unless a new average is wanted, its averager state there. A save that
        was interrupted (a killed process, a rank failing mid-save) is passed over."""
        if not os.path.isdir(self.args.output_dir):
            return None
        needs_average = not self.wavg_config.restart_average_on_resume
        for checkpoint in reversed(sort_checkpoints(self.args.output_dir)):
            if saved_trainer_state(checkpoint) is None:
                logger.warning("hf_wavg: %s has no readable %s (an interrupted save?); looking at older checkpoints",
                               checkpoint, TRAINER_STATE_NAME)
            elif needs_average and not has_state(checkpoint):
                logger.warning("hf_wavg: %s holds no averager state (an interrupted save?); looking at older "
                               "checkpoints", checkpoint)
            else:
                return checkpoint
        return None

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        if self.safety_monitor is not None:
            self.safety_monitor.last_step = None  # each evaluate() call runs the suite once
        # Mirror Trainer's handling of a dict of datasets here, so that each one is evaluated
        # raw and averaged once, and raw metrics are always named "<prefix>_raw_...".
        override = eval_dataset is not None
        datasets = eval_dataset if override else self.eval_dataset
        if not isinstance(datasets, dict):
            return self._evaluate_raw_and_average(eval_dataset, ignore_keys, metric_key_prefix, "")
        metrics: dict[str, float] = {}
        for name, dataset in datasets.items():
            metrics.update(
                self._evaluate_raw_and_average(dataset if override else name, ignore_keys, metric_key_prefix, f"_{name}")
            )
        return metrics

    def _evaluate_raw_and_average(
        self, dataset: Any, ignore_keys: list[str] | None, prefix: str, suffix: str
    ) -> dict[str, float]:
        evaluate = super().evaluate
        if self.wavg_config.evaluate_average and not self._average_ready():
            self._warn_unaveraged(f"{prefix}_* metrics are the raw weights'")
        if not self.wavg_config.evaluate_average or not self._average_ready() or self._average_swapped_in():
            return evaluate(dataset, ignore_keys, f"{prefix}{suffix}")
        metrics: dict[str, float] = {}
        if self.wavg_config.evaluate_raw:
            metrics.update(evaluate(dataset, ignore_keys, f"{prefix}_raw{suffix}"))
        # The average goes last: `on_evaluate` callbacks (early stopping) see its metrics.
        with self.averaged_weights():
            metrics.update(evaluate(dataset, ignore_keys, f"{prefix}{suffix}"))
        return metrics

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> Any:
        """Predictions of the average, like ``evaluate()`` (``predict_average=False``: of the
        raw weights)."""
        if not self.wavg_config.predict_average:
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)
        if not self._average_ready():
            self._warn_unaveraged("predict() uses the raw weights")
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)
        with self.averaged_weights():
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def unaveraged_reason(self) -> str | None:
        """Why there is no average to use, or None when there is one."""
        averager = self.averager
        if averager is None:
            return "training has not begun"
        if averager.has_average:
            return None
        if averager.num_skipped:
            return f"every snapshot ({averager.num_skipped}) held NaN or inf and was skipped"
        return (f"no optimizer step reached the first step to average (step {self.wavg_callback.first_step}; "
                f"training is at step {self.state.global_step})")

    def _warn_unaveraged(self, consequence: str) -> None:
        reason = self.unaveraged_reason()
        if reason is not None and self._unaveraged_warned_at != (self.state.global_step, consequence):
            self._unaveraged_warned_at = (self.state.global_step, consequence)
            logger.warning("hf_wavg: NO AVERAGE yet, %s: %s", consequence, reason)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The norm the Trainer computes every optimizer step tells the callback whether the
        # step kept the weights finite, so the average need not read them twice.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        rates = [group.get("lr", float("nan")) for group in self.optimizer.param_groups]
        self.wavg_callback.note_step_signal(grad_norm, rates)
        return grad_norm

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Checkpoints hold the raw weights: training resumes from them.
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._saving_checkpoint:
            super().save_model(output_dir, _internal_call)
            # The averager state goes in with the weights, before the Trainer rotates older
            # checkpoints away: a failure from here on leaves the previous one whole.
            self.wavg_callback.save_state(output_dir or self.args.output_dir, self.args, self.state.global_step)
            return
        save_average = self.wavg_config.save_average
        if save_average and not self._average_ready():
            self._warn_unaveraged("save_model() writes the raw weights, and its record and model card say so")
        with self.averaged_weights() if save_average and self._average_ready() else nullcontext():
            self._refuse_non_finite()
            super().save_model(output_dir, _internal_call)
        if save_average and self.args.should_save:
            target = output_dir or self.args.output_dir
            with open(os.path.join(target, AVERAGING_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.averaging_summary(), handle, indent=2)
            if self.safety_monitor is not None and self.safety_monitor.history:
                self.safety_monitor.write_report(target)
                self.safety_monitor.plot(target)

    def _refuse_non_finite(self) -> None:
        """A model folder is for using: weights holding NaN or inf are not written as one."""
        averager = self.averager
        if averager is not None and not averager.weights_finite():
            raise ValueError(
                "hf_wavg: the weights to save hold NaN or inf; refusing to write them as a model (the checkpoints "
                "keep every saved step's raw weights and average)"
            )

    def averaging_summary(self) -> dict[str, Any]:
        """How the saved weights were averaged (or why they are not an average), with the
        last raw and averaged metrics."""
        reason = self.unaveraged_reason()
        summary: dict[str, Any] = {"averaged": reason is None, "config": self.wavg_config.to_dict()}
        if reason is not None:
            summary["not_averaged_because"] = reason
        if self.averager is not None:
            summary["averager"] = self.averager.describe()
            summary["window"] = self.wavg_callback.window().describe()
            if self.wavg_callback.run_config != self.wavg_config:  # a horizon set from the run's length
                summary["resolved_config"] = self.wavg_callback.run_config.to_dict()
        evaluations = [log for log in self.state.log_history if any(k.startswith("eval_") for k in log)]
        if evaluations:
            # Raw and averaged metrics of one evaluation are logged as separate entries.
            step = evaluations[-1].get("step")
            summary["last_evaluation"] = {k: v for log in evaluations if log.get("step") == step for k, v in log.items()}
        return summary

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero() or not self.wavg_config.save_average:
            return
        card_path = os.path.join(self.args.output_dir, "README.md")
        with open(card_path, "a", encoding="utf-8") as handle:
            handle.write("\n" + averaging_card_section(self.averaging_summary()))
            if self.safety_monitor is not None and self.safety_monitor.history:
                handle.write("\n" + self.safety_monitor.card_section())
                if os.path.isfile(os.path.join(self.args.output_dir, SAFETY_PLOT_FILE)):
                    handle.write("\n" + PLOT_MARKDOWN)
        # The metadata's results: the saved average's, from the records save_model() wrote.
        dataset = kwargs.get("dataset")
        card = add_eval_results(ModelCard.load(card_path), self.args.output_dir,
                                kwargs.get("model_name") or os.path.basename(os.path.abspath(self.args.output_dir)),
                                dataset if isinstance(dataset, str) else None)
        card.save(card_path)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        config = self.safety_config
        if config is None or not config.safety_logit_pairing_weight or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        penalty = logit_pairing_penalty(
            model, self.processing_class, inputs, outputs.logits, config.languages, self._pairing_rng
        )
        loss = loss + config.safety_logit_pairing_weight * penalty
        return (loss, outputs) if return_outputs else loss
