"""``WAvgTrainer``: a drop-in ``Trainer`` whose evaluations, saves and Hub pushes use the
averaged weights, while training itself continues from the raw ones."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from huggingface_hub import ModelCard
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from hf_wavg.averager import WeightAverager
from hf_wavg.batchnorm import recomputed_batchnorm
from hf_wavg.callback import WAvgCallback, saved_trainer_state
from hf_wavg.callback_group import WAvgCallbacks
from hf_wavg.card_file import card_metadata, write_model_card
from hf_wavg.card_results import add_eval_results
from hf_wavg.config import WAvgConfig
from hf_wavg.loggers import publish_safety
from hf_wavg.model_card import PLOT_MARKDOWN, averaging_card_section
from hf_wavg.records import AVERAGING_FILE, MODEL_CARD_FILE, SAFETY_DELTA, SAFETY_PLOT_FILE
from hf_wavg.safety.catalog import HEADLINE_METRICS
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.logit_pairing import logit_pairing_penalty
from hf_wavg.safety_monitor import SafetyMonitor
from hf_wavg.state_io import has_state
from hf_wavg.values import is_finite_number

logger = logging.getLogger(__name__)
CONSOLE_CALLBACKS = (PrinterCallback, ProgressCallback)
# transformers' notebook progress bar imports IPython: it is recognised without importing it
# (a callback of that class can exist only once its module has been imported).
NOTEBOOK_MODULE = "transformers.utils.notebook"
# Packages whose callbacks never write the weights, so the gradient norm vouches for them.
_CALLBACK_PACKAGES_THAT_LEAVE_WEIGHTS_ALONE = ("transformers", "hf_wavg")
BEST = "best"  # wavg_selection: the average that scores best on metric_for_best_model


def _prints_to_console(callback: Any) -> bool:
    notebook = sys.modules.get(NOTEBOOK_MODULE)
    return isinstance(callback, CONSOLE_CALLBACKS) or (
        notebook is not None and isinstance(callback, notebook.NotebookProgressCallback))


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

    Several averages side by side: ``wavg_config`` may map names to configs, e.g.
    ``{"ema": WAvgConfig(), "swa": WAvgConfig(method="swa", start_fraction=0.5)}``. Each is
    evaluated as ``eval_<name>_*`` (its safety metrics as ``safety/<name>/*``, paired against
    the same raw weights), its state kept in ``<checkpoint>/wavg_averages/<name>/`` and
    resumed, and the card compares them. ``wavg_selection`` names the one that ``eval_*``
    metrics (hence best-model selection and early stopping), ``predict()``, ``save_model()``
    and the card use: a name (default: the first), or ``"best"``, the one scoring best on
    ``metric_for_best_model`` at each evaluation (it is evaluated once more as ``eval_*``).
    """

    def __init__(
        self,
        *args: Any,
        wavg_config: WAvgConfig | Mapping[str, WAvgConfig] | None = None,
        safety_config: SafetyConfig | None = None,
        safety_dataset: Any = None,
        wavg_selection: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.safety_config = safety_config
        safety_dataset = safety_dataset if safety_dataset is not None else self.eval_dataset
        if isinstance(wavg_config, Mapping):
            group = WAvgCallbacks(wavg_config, safety_config, safety_dataset, self.processing_class)
            self._raw_share = group.raw_share
            self._averages: dict[str | None, WAvgCallback] = {name: cb for name, cb in group.callbacks.items()}
            self.wavg_selection: str | None = self._checked_selection(wavg_selection)
            self.wavg_config = next(iter(wavg_config.values())) if self.wavg_selection == BEST \
                else wavg_config[self.wavg_selection]
            self.add_callback(group)
        else:
            if wavg_selection is not None:
                raise ValueError("wavg_selection chooses among named averages: pass wavg_config as a dict of them")
            self.wavg_config = wavg_config or WAvgConfig()
            self.wavg_selection = None
            self._averages = {None: WAvgCallback(self.wavg_config, safety_config=safety_config,
                                                 safety_dataset=safety_dataset, tokenizer=self.processing_class)}
            self.add_callback(self._averages[None])
        for callback in self._averages.values():
            callback.log_fn = self.log_to_integrations
            callback.publish_fn = lambda monitor, step: publish_safety(self.callback_handler.callbacks, monitor, step)
        self._training_ended = False
        self._saving_checkpoint = False
        self._unaveraged_warned_at: tuple[int, str] | None = None
        self._foreign_callbacks_noted = False
        self._pairing_rng = random.Random(safety_config.safety_seed if safety_config else 0)
        self._evaluation_splits: list[str] = []  # the names of the last evaluate()'s datasets, if a dict

    def log_to_integrations(self, logs: dict[str, float]) -> None:
        """``Trainer.log`` without the console printers: the safety suite's many keys reach
        ``log_history`` and every ``report_to`` logger, while the console gets its table."""
        entry = {**logs, "step": self.state.global_step}
        if self.state.epoch is not None:
            entry["epoch"] = self.state.epoch
        self.state.log_history.append(entry)
        for callback in self.callback_handler.callbacks:
            if not _prints_to_console(callback):
                callback.on_log(self.args, self.state, self.control, logs=logs, model=self.model,
                                processing_class=self.processing_class)

    def _checked_selection(self, selection: str | None) -> str:
        names = [name for name in self._averages if name is not None]
        if selection is None:
            return names[0]
        if selection == BEST:
            if not self.args.metric_for_best_model:
                raise ValueError("wavg_selection='best' picks by metric_for_best_model; set it in TrainingArguments")
            return selection
        if selection not in names:
            raise ValueError(f"wavg_selection={selection!r} is none of the averages {names} (or 'best')")
        return selection

    @property
    def average_names(self) -> list[str]:
        """The names of the averages kept side by side (empty for a single average)."""
        return [name for name in self._averages if name is not None]

    @property
    def wavg_callback(self) -> WAvgCallback:
        """The callback of the selected average (see :meth:`selected_average`)."""
        return self._averages[self.selected_average()]

    def wavg_callback_of(self, name: str) -> WAvgCallback:
        """The callback keeping the named average ``name``."""
        if name not in self.average_names:
            raise KeyError(f"no average named {name!r}; the averages are {self.average_names}")
        return self._averages[name]

    def selected_average(self) -> str | None:
        """The name of the average that ``eval_*``, ``predict()``, ``save_model()`` and the
        card use (None for a single average). With ``wavg_selection="best"``: the best one at
        the evaluation of the loaded best checkpoint once training has ended with
        ``load_best_model_at_end``, else at the last evaluation (the first before any)."""
        if self.wavg_selection != BEST:
            return self.wavg_selection
        step: float | None = (self.state.best_global_step if self._training_ended and self.args.load_best_model_at_end
                              else None)
        evaluations = [log for log in self.state.log_history if "step" in log and any(k.startswith("eval_") for k in log)]
        if step is None and evaluations:
            step = evaluations[-1]["step"]
        logged = {key: value for log in evaluations if log["step"] == step for key, value in log.items()}
        return self._best_of(logged, "eval") or self.average_names[0]

    def _best_of(self, metrics: dict[str, Any], prefix: str) -> str | None:
        """The named average scoring best on ``metric_for_best_model`` in ``metrics`` (the
        first of equals), or None when none is scored."""
        metric = (self.args.metric_for_best_model or "").removeprefix(f"{prefix}_").removeprefix("eval_")
        logged = {name: metrics.get(f"{prefix}_{name}_{metric}") for name in self.average_names}
        scores = {name: float(v) for name, v in logged.items() if v is not None and is_finite_number(v)}
        if not scores:
            return None
        return (max if self.args.greater_is_better else min)(scores, key=scores.__getitem__)

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
    def averaged_weights(self, name: str | None = None) -> Iterator[nn.Module]:
        """The model with the average (the selected one, or the one named ``name``) swapped in,
        with BatchNorm statistics recomputed for it when configured; the raw weights come
        back bit for bit afterwards."""
        callback = self.wavg_callback if name is None else self.wavg_callback_of(name)
        config = callback.config
        recompute = config.recompute_batchnorm and not (callback.averager is not None and callback.averager.is_swapped_in)
        with callback.averaged_weights() as model:
            context = recomputed_batchnorm(model, self._training_batches(), config.batchnorm_batches) \
                if recompute else nullcontext()
            with context:
                yield model

    def _training_batches(self) -> Iterator[dict[str, Any]]:
        for batch in self.get_train_dataloader():
            yield self._prepare_inputs(batch)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_resumable_checkpoint()
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        for callback in self._averages.values():
            callback.resume_from_checkpoint = resume_from_checkpoint or None
        self._training_ended = False
        output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
        self._training_ended = True
        return output

    def _last_resumable_checkpoint(self) -> str | None:
        """The newest complete checkpoint: its trainer state (which the Trainer writes last)
        readable and, unless a new average is wanted, its averager state there. A save that
        was interrupted (a killed process, a rank failing mid-save) is passed over."""
        if not os.path.isdir(self._output_dir):
            return None
        needs_average = not self.wavg_config.restart_average_on_resume
        for checkpoint in reversed(sort_checkpoints(self._output_dir)):
            if saved_trainer_state(checkpoint) is None:
                logger.warning("hf_wavg: %s has no readable %s (an interrupted save?); looking at older checkpoints",
                               checkpoint, TRAINER_STATE_NAME)
            elif needs_average and not all(has_state(c.state_dir(checkpoint)) for c in self._averages.values()):
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
        for callback in self._averages.values():
            if callback.safety_monitor is not None:
                callback.safety_monitor.last_step = None  # each evaluate() call runs the suite once
        # Mirror Trainer's handling of a dict of datasets here, so that each one is evaluated
        # raw and averaged once, and raw metrics are always named "<prefix>_raw_...".
        override = eval_dataset is not None
        datasets = eval_dataset if override else self.eval_dataset
        parts = [(dataset if override else name, f"_{name}") for name, dataset in datasets.items()] \
            if isinstance(datasets, dict) else [(eval_dataset, "")]
        self._evaluation_splits = [suffix.removeprefix("_") for _, suffix in parts if suffix]
        if self.wavg_selection is not None:
            return self._evaluate_named_averages(parts, ignore_keys, metric_key_prefix)
        metrics: dict[str, float] = {}
        for dataset, suffix in parts:
            metrics.update(self._evaluate_raw_and_average(dataset, ignore_keys, metric_key_prefix, suffix))
        return metrics

    def _evaluate_named_averages(self, parts: list[tuple[Any, str]], ignore_keys: list[str] | None,
                                 prefix: str) -> dict[str, float]:
        """Raw weights as ``<prefix>_raw_*``, each named average as ``<prefix>_<name>_*``,
        and the selected one last as ``<prefix>_*`` (callbacks such as early stopping read
        the last evaluation's metrics)."""
        metrics: dict[str, float] = {}

        def evaluate_all(key_prefix: str) -> None:
            for dataset, suffix in parts:
                metrics.update(super(WAvgTrainer, self).evaluate(dataset, ignore_keys, f"{key_prefix}{suffix}"))

        ready = [name for name in self.average_names
                 if (averager := self._averages[name].averager) is not None and averager.has_average]
        if not self.wavg_config.evaluate_average or not ready:
            if self.wavg_config.evaluate_average:
                self._warn_unaveraged(f"{prefix}_* metrics are the raw weights'")
            evaluate_all(prefix)
            return metrics
        # The safety suite first, while the raw weights are in the model: every average is
        # paired with the same raw weights, measured once (the monitors share one config and data).
        with self._raw_share.round():
            for callback in self._averages.values():
                monitor = callback.safety_monitor
                if monitor is not None and not monitor.config.safety_every_updates and monitor.last_step is None:
                    callback.run_safety(self.args, self.state, self.model, self.processing_class, metrics)
        if self.wavg_config.evaluate_raw:
            evaluate_all(f"{prefix}_raw")
        for name in ready:
            if name != self.wavg_selection:
                with self.averaged_weights(name):
                    evaluate_all(f"{prefix}_{name}")
        chosen = self.wavg_selection
        if chosen == BEST:
            chosen = self._best_of(metrics, prefix)
            if chosen is None:
                raise ValueError(f"wavg_selection='best' picks by metric_for_best_model "
                                 f"({self.args.metric_for_best_model}), which the evaluation did not report")
        if chosen in ready:
            with self.averaged_weights(chosen):
                evaluate_all(prefix)
        else:
            self._warn_unaveraged(f"{prefix}_* metrics are the raw weights'")
            evaluate_all(prefix)
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

    # Private Trainer methods, overridden or called where no public hook does the job; their
    # signatures are checked by tests/training/test_private_trainer_api.py (last checked on transformers 5.25).

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The norm the Trainer computes every optimizer step tells the callback whether the
        # step kept the weights finite, so the average need not read them twice. No callback
        # hook receives it.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._callbacks_leave_weights_alone() and self.optimizer is not None:
            rates = [group.get("lr", float("nan")) for group in self.optimizer.param_groups]
            for callback in self._averages.values():
                callback.note_step_signal(grad_norm, rates)
        return grad_norm

    def _callbacks_leave_weights_alone(self) -> bool:
        """Whether every callback is transformers' or hf_wavg's, none of which writes the
        weights. Another one (pruning, clipping, re-initialising...) may change them outside
        the optimizer step, where the gradient norm cannot vouch for them: every snapshot is
        then read before it is folded in."""
        foreign = [type(c).__name__ for c in self.callback_handler.callbacks
                   if type(c).__module__.partition(".")[0] not in _CALLBACK_PACKAGES_THAT_LEAVE_WEIGHTS_ALONE]
        if foreign and not self._foreign_callbacks_noted:
            self._foreign_callbacks_noted = True
            logger.info("hf_wavg: callback %s may change the weights outside the optimizer; each snapshot is read "
                        "for NaN and inf before it is averaged", ", ".join(foreign))
        return not foreign

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Checkpoints hold the raw weights: training resumes from them. save_model() cannot tell a
        # checkpoint's save from the others (push_to_hub and the end of training also pass
        # _internal_call=True), so the checkpoint marks its own.
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
            for callback in self._averages.values():
                callback.save_state(output_dir or self._output_dir, self.args, self.state.global_step)
            return
        save_average = self.wavg_config.save_average
        if save_average and not self._average_ready():
            self._warn_unaveraged("save_model() writes the raw weights, and its record and model card say so")
        with self.averaged_weights() if save_average and self._average_ready() else nullcontext():
            self._refuse_non_finite()
            super().save_model(output_dir, _internal_call)
        if save_average and self.args.should_save:
            target = output_dir or self._output_dir
            with open(os.path.join(target, AVERAGING_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.averaging_summary(), handle, indent=2)
            for callback in self._averages.values():  # each named average's, for comparison
                if callback.name is not None and callback.safety_monitor is not None and callback.safety_monitor.history:
                    callback.safety_monitor.write_report(target)
            if self.safety_monitor is not None and self.safety_monitor.history:
                self.safety_monitor.write_report(target, as_saved_model=True)
                self.safety_monitor.plot(target)
            # The folder is a Hub model as it lies: its card, made from the records just written.
            write_model_card(target, data=card_metadata(target, base_model=self._base_model_name()), refresh=True)

    @property
    def _output_dir(self) -> str:
        """``args.output_dir``, which TrainingArguments sets to a default when it is None."""
        return str(self.args.output_dir)

    def _base_model_name(self) -> str | None:
        """What the run started from: the name or folder the model was loaded from, if any."""
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return getattr(config, "_name_or_path", None) or None

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
        callback = self.wavg_callback  # the selected average's
        summary: dict[str, Any] = {"averaged": reason is None, "config": callback.config.to_dict()}
        if reason is not None:
            summary["not_averaged_because"] = reason
        if callback.averager is not None:
            summary["averager"] = callback.averager.describe()
            summary["window"] = callback.window().describe()
            if callback.run_config != callback.config:  # a horizon set from the run's length
                summary["resolved_config"] = callback.run_config.to_dict()
        evaluations = [log for log in self.state.log_history if any(k.startswith("eval_") for k in log)]
        last: dict[str, Any] = {}
        if evaluations:
            # Raw and averaged metrics of one evaluation are logged as separate entries.
            step = evaluations[-1].get("step")
            last = {k: v for log in evaluations if log.get("step") == step for k, v in log.items()}
        named = {name: f"eval_{name}_" for name in self.average_names}
        if last:
            summary["last_evaluation"] = {k: v for k, v in last.items() if not k.startswith(tuple(named.values()))}
            if self._evaluation_splits:  # eval_<split>_<metric> keys: which part is the split
                summary["evaluation_splits"] = list(self._evaluation_splits)
        if named:
            summary["selected"] = self.selected_average()
            summary["selection"] = (f"best {self.args.metric_for_best_model} at each evaluation"
                                    if self.wavg_selection == BEST else "named")
            summary["averages"] = {name: self._named_summary(name, last, key_prefix) for name, key_prefix in named.items()}
        return summary

    def _named_summary(self, name: str, last: dict[str, Any], key_prefix: str) -> dict[str, Any]:
        """One named average's settings, last metrics and last safety deltas."""
        callback = self._averages[name]
        entry: dict[str, Any] = {"config": callback.config.to_dict()}
        if callback.averager is not None:
            entry["averager"] = callback.averager.describe()
            entry["window"] = callback.window().describe()
        if self.wavg_selection == name:  # its metrics are the plain eval_* ones
            key_prefix = "eval_"
            last = {k: v for k, v in last.items() if not k.startswith(("eval_raw_", *(f"eval_{n}_" for n in self.average_names)))}
        entry["metrics"] = {k.removeprefix(key_prefix): v for k, v in last.items() if k.startswith(key_prefix)}
        monitor = callback.safety_monitor
        deltas = next((e["metrics"] for e in reversed(monitor.history) if e["weights"] == SAFETY_DELTA), None) \
            if monitor is not None else None
        if deltas is not None:  # average minus raw, paired, at the last safety evaluation
            entry["safety_delta"] = {
                key: {part: deltas[f"delta/{key}{suffix}"] for part, suffix in (("value", ""), ("ci_low", "_ci_low"),
                                                                                  ("ci_high", "_ci_high"))}
                for key, _ in HEADLINE_METRICS
                if all(is_finite_number(deltas.get(f"delta/{key}{suffix}")) for suffix in ("", "_ci_low", "_ci_high"))
            }
        return entry

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero() or not self.wavg_config.save_average:
            return
        card_path = os.path.join(self._output_dir, MODEL_CARD_FILE)
        with open(card_path, "a", encoding="utf-8") as handle:
            handle.write("\n" + averaging_card_section(self.averaging_summary()))
            if self.safety_monitor is not None and self.safety_monitor.history:
                handle.write("\n" + self.safety_monitor.card_section())
                if os.path.isfile(os.path.join(self._output_dir, SAFETY_PLOT_FILE)):
                    handle.write("\n" + PLOT_MARKDOWN)
        # The metadata's results: the saved average's, from the records save_model() wrote.
        dataset = kwargs.get("dataset")
        card = add_eval_results(ModelCard.load(card_path), self._output_dir,
                                kwargs.get("model_name") or os.path.basename(os.path.abspath(self._output_dir)),
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
