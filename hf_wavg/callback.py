"""``WAvgCallback``: weight averaging for any ``transformers.Trainer`` (TRL's included).

The callback builds its averager when training begins (after Accelerate has prepared
the model), folds the weights in after optimizer steps, writes its state into every
checkpoint folder and reads it back on resume. Evaluating or saving the average is
the job of :class:`hf_wavg.WAvgTrainer`, or of :meth:`WAvgCallback.averaged_weights`
for other trainers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_wavg.averager import WeightAverager
from hf_wavg.averaging.methods import METHODS
from hf_wavg.averaging.window import AveragingWindow, averaging_window, update_steps
from hf_wavg.config import WAvgConfig
from hf_wavg.records import AVERAGES_DIR, STATE_FILE
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.suite import SafetyResult
from hf_wavg.safety_monitor import SafetyData, SafetyMonitor, safety_data_from
from hf_wavg.state_io import AveragerStateError, has_state
from hf_wavg.teardown import leave_together_at_exit

# The largest learning rate x max(1, gradient norm) of a step that vouches for the weights
# without reading them (see WAvgCallback._step_kept_weights_finite).
LARGEST_VOUCHED_STEP = 1e20

logger = logging.getLogger(__name__)


def saved_trainer_state(checkpoint: str) -> TrainerState | None:
    """The trainer state in ``checkpoint``, or None when it is missing or unreadable (the
    Trainer writes it last, so a save killed midway leaves none or a partial one)."""
    try:
        return TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    except (OSError, ValueError, TypeError):
        return None


def _resumed_from(checkpoint: str, state: TrainerState) -> bool:
    """Whether ``checkpoint`` holds the trainer state the Trainer resumed with: the same log
    history, which another run's checkpoint at the same step will not share."""
    saved = saved_trainer_state(checkpoint)
    # Compared as JSON, where a logged NaN equals itself.
    return (saved is not None and saved.global_step == state.global_step
            and json.dumps(saved.log_history) == json.dumps(state.log_history))


@dataclass
class RawResultShare:
    """The raw weights' safety result while one event goes round the named averages of a
    run: the raw weights are the same for all of them then, so the first average to run the
    suite measures them and the others pair with that result (one suite run, not N)."""

    result: SafetyResult | None = None
    depth: int = 0  # events raised inside a round (a log during an evaluation) belong to it

    @contextmanager
    def round(self) -> Iterator[None]:
        """One event handed to every average; nothing carries over to the next one."""
        if not self.depth:
            self.result = None
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth:
                self.result = None


class WAvgCallback(TrainerCallback):
    """Keep a running average of the model's weights while a Trainer trains.

    Args:
        config: averaging settings; defaults to ``WAvgConfig()`` (an EMA over about the last fifth of training).
        resume_from_checkpoint: checkpoint folder that training resumes from. When ``None``
            and the Trainer resumes, the callback reads ``<output_dir>/checkpoint-<step>``,
            where the Trainer writes its checkpoints, after checking that its trainer state is
            the one the Trainer resumed with (a Trainer does not tell its callbacks which
            folder it resumed from); when it is not, pass the folder here.
        safety_config: run the safety suite on the average at each evaluation (or every
            ``safety_every_updates`` updates); its metrics join the evaluation's metrics and
            ``state.log_history``, and ``<output_dir>/safety_report.json`` is rewritten.
        safety_dataset: texts (and labels) for the suite: a ``datasets.Dataset`` or a dict of
            columns named as in ``safety_config``.
        tokenizer: the model's tokenizer; by default the Trainer's ``processing_class``.
        name: this average's name when a Trainer keeps several (see :class:`WAvgCallbacks`):
            its state goes to ``<checkpoint>/wavg_averages/<name>/`` and its safety metrics
            are logged as ``safety/<name>/...``.
    """

    def __init__(
        self,
        config: WAvgConfig | None = None,
        resume_from_checkpoint: str | None = None,
        safety_config: SafetyConfig | None = None,
        safety_dataset: Any = None,
        tokenizer: Any = None,
        name: str | None = None,
    ) -> None:
        self.config = config or WAvgConfig()
        self.name = name
        self.resume_from_checkpoint = resume_from_checkpoint
        self.averager: WeightAverager | None = None
        self.run_config = self.config  # with horizon resolved once the run's length is known
        self.first_step = 0
        self.update_steps = range(0)
        self.total_steps = 0
        # Whether every optimizer step since the last check kept the weights finite (a lazy
        # boolean tensor), or None: the next snapshot must be read to know.
        self._finite_since_check: torch.Tensor | None = None
        self._step_signal: tuple[Any, list[float]] | None = None
        self._float32_weights = False
        self._saved_step: int | None = None
        self.safety_monitor = SafetyMonitor(safety_config, name) if safety_config is not None else None
        self.safety_data: SafetyData = (
            safety_data_from(safety_dataset, safety_config) if safety_config is not None else (None, None, None)
        )
        self.tokenizer = tokenizer
        # Where safety metrics go besides the evaluation's metrics: WAvgTrainer sets a log
        # that reaches every report_to integration but not the console (which gets a
        # table instead); otherwise log_history.
        self.log_fn: Callable[[dict[str, float]], None] | None = None
        # Sends each safety evaluation's table and plot to the experiment trackers (WAvgTrainer sets it).
        self.publish_fn: Callable[[SafetyMonitor, int], None] | None = None
        # The raw weights' result shared with the other named averages of a WAvgCallbacks group.
        self.raw_share: RawResultShare | None = None

    def state_dir(self, checkpoint: str) -> str:
        """Where this average's state lies in ``checkpoint``."""
        return checkpoint if self.name is None else os.path.join(checkpoint, AVERAGES_DIR, self.name)

    def should_update(self, step: int) -> bool:
        return step in self.update_steps

    @contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The model with the average swapped in, for evaluating or saving it by hand."""
        if self.averager is None:
            raise RuntimeError("WAvgCallback has no averager yet: training has not begun")
        with self.averager.swapped_in() as model:
            yield model

    # -- Trainer events ----------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("WAvgCallback needs the Trainer's model; it received none")
        if self.config.refine_every_epochs and (args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"):
            # DeepSpeed steps its own float32 master copy: weights written into the model
            # would be overwritten by the next step, and training would not restart from them.
            raise ValueError("WAvgConfig.refine_every_epochs is not supported under DeepSpeed, whose optimizer "
                             "keeps its own master weights; use FSDP or DDP, or set it to 0")
        self._saved_step = None  # per run: a second train() must save its own average
        self.run_config = self.config.resolved(state.max_steps)
        self.averager = self.run_config.build_averager(model, data_parallel=args.world_size > 1)
        if args.world_size > 1:
            leave_together_at_exit()  # ranks must not leave gloo one by one (see teardown.py)
        self.first_step = self.run_config.start_at(state.max_steps)
        self.total_steps = state.max_steps
        self.update_steps = update_steps(self.first_step, self.run_config.update_every, state.max_steps)
        self._announce_window(state)
        method = METHODS[self.config.method]
        if method.needs_checkpoints and args.save_strategy == "no" and state.is_world_process_zero:
            logger.warning("hf_wavg: method=%r stores what it averages in checkpoints, and this run saves none "
                           "(save_strategy='no'): %s. Save a checkpoint every ~10%% of training",
                           method.name, method.needs_checkpoints)
        # Weights are read once (the first update checks them); after that a step with a
        # finite gradient norm keeps them finite. Half-precision weights can overflow.
        self._finite_since_check, self._step_signal = None, None
        self._float32_weights = self.averager.averages_float32_weights
        if state.global_step > 0:
            self._restore(args, state)

    def window(self, num_updates: int | None = None) -> AveragingWindow:
        """What the average spans after ``num_updates`` snapshots (default: so far)."""
        if self.averager is None:
            raise RuntimeError("WAvgCallback has no averager yet: training has not begun")
        count = self.averager.num_updates if num_updates is None else num_updates
        # A horizon promises the window at the end of the run: only the final window is held to it.
        promised = self.config.promised_window(self.total_steps) if count == len(self.update_steps) else None
        return averaging_window(self.averager.strategy, count, self.update_steps, self.total_steps, promised)

    def _announce_window(self, state: TrainerState) -> None:
        planned = self.window(len(self.update_steps))
        if not state.is_world_process_zero:
            return
        if planned.is_narrow:
            logger.warning(
                "hf_wavg: the average will span only %s: it will be close to the last weights. Set "
                "WAvgConfig(horizon=...) to average over a share of training", planned.sentence()
            )
        else:
            logger.info("hf_wavg: the average will span %s", planned.sentence())
        if planned.delivers_promise is False:
            logger.warning(
                "hf_wavg: horizon=%g asks for an effective window of %.1f steps, but %d updates every %d steps give "
                "%.1f: too few updates for this horizon (the record and the model card say so)",
                self.config.horizon_in_effect, planned.promised_steps, planned.snapshots, planned.update_every,
                planned.window_steps,
            )
        unmet = self.averager.strategy.unmet_setting(planned.snapshots) if self.averager else None
        if unmet is not None:
            logger.warning("hf_wavg: %s. Set WAvgConfig(horizon=...) to choose the span instead", unmet)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.averager is not None
        if self.run_config.restart_average_on_resume:
            logger.info("hf_wavg: resuming at step %d with a new average (restart_average_on_resume)", state.global_step)
            return
        checkpoint = self.resume_from_checkpoint
        guessed = checkpoint is None
        if checkpoint is None:
            checkpoint = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        state_dir = self.state_dir(checkpoint)
        if not has_state(state_dir):
            # A Trainer does not say which folder it resumed from; a guess may just be the wrong one.
            told = ("if the Trainer resumed from another folder, pass it as "
                    "WAvgCallback(resume_from_checkpoint=...); else " if guessed else "")
            raise AveragerStateError(
                f"training resumes at step {state.global_step}, but {state_dir} holds no averager state "
                f"({STATE_FILE}): {told}pass WAvgConfig(restart_average_on_resume=True) to start a new average "
                "(the saved one is not used)"
            )
        # A Trainer does not tell its callbacks which folder it resumed from: check that the
        # state was saved beside the weights the Trainer loaded (and, for a guessed folder,
        # its trainer state) rather than hand back another run's average.
        same_weights = self.averager.holds_weights_saved_with(state_dir)
        if same_weights is False or (guessed and not _resumed_from(checkpoint, state)):
            raise AveragerStateError(
                f"training resumes at step {state.global_step}, but not from {checkpoint}: its averager state was "
                "saved beside other weights than the ones the Trainer loaded. Pass the folder the Trainer resumes "
                "from as WAvgCallback(resume_from_checkpoint=...)"
            )
        self.averager.load(state_dir)
        logger.info("hf_wavg: restored the average of %d snapshots from %s", self.averager.num_updates, state_dir)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # A step skipped by the fp16 loss scaler left the weights unchanged: folding them
        # in again would count one snapshot twice.
        if self.averager is None or getattr(optimizer, "step_was_skipped", False):
            self._finite_since_check = None
            return
        kept_finite = self._step_kept_weights_finite()
        if self._finite_since_check is not None and kept_finite is not None:
            self._finite_since_check = self._finite_since_check & kept_finite  # on the device: no sync
        else:
            self._finite_since_check = None
        if not self.should_update(state.global_step):
            return
        known_finite = self._finite_since_check is not None and bool(self._finite_since_check)
        updated = self.averager.update(step=state.global_step, known_finite=known_finite)
        # Known bounded now (vouched for, or read); a skipped snapshot, or weights read but
        # too large to vouch for, leave the next one to be read.
        vouched = updated and (known_finite or self.averager.last_snapshot_bounded)
        self._finite_since_check = torch.tensor(True) if vouched else None
        if updated:
            every = self.safety_monitor.config.safety_every_updates if self.safety_monitor else 0
            if every and self.averager.num_updates % every == 0:
                self.run_safety(args, state, kwargs.get("model"), kwargs.get("processing_class"), None)

    def note_step_signal(self, grad_norm: Any, learning_rates: list[float]) -> None:
        """The gradient norm (a float or a 0-d tensor) and learning rates of the coming
        optimizer step: :class:`WAvgTrainer` passes those the Trainer has anyway."""
        self._step_signal = (grad_norm, learning_rates)

    def _step_kept_weights_finite(self) -> torch.Tensor | None:
        """Whether this optimizer step took bounded float32 weights to bounded ones.

        The last read of the weights found every one finite and below
        ``kernels.BOUNDED_MAGNITUDE`` (1.8e19); this step's gradient norm G and learning
        rates are finite, and ``max(rate) * max(1, G) <= LARGEST_VOUCHED_STEP`` (1e20). An
        optimizer that moves no weight by more than 1e6 * rate * max(1, G) in a step (SGD
        with momentum below 0.999999, Adam and AdamW with eps > 0, Lion...) then
        keeps them finite for 10^12 steps, so they need not be read again. Without a gradient
        norm (a Trainer other than WAvgTrainer, or one with a callback that may write the
        weights) every snapshot is read. Returns a boolean 0-d tensor, left on the gradient's
        device (read once per update, not per step), or None when unknown."""
        signal, self._step_signal = self._step_signal, None
        if signal is None or signal[0] is None or not self._float32_weights:
            return None
        grad_norm, rates = signal
        largest_rate = max((abs(float(rate)) for rate in rates), default=0.0)
        if not math.isfinite(largest_rate):
            return None
        # NaN stays NaN through clamp_min and compares False: no sync here.
        return torch.as_tensor(grad_norm).clamp_min(1.0) * largest_rate <= LARGEST_VOUCHED_STEP

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        monitor = self.safety_monitor
        if monitor is None or monitor.config.safety_every_updates:
            return
        if monitor.last_step == state.global_step:  # one run per step, even for a dict of eval sets
            return
        self.run_safety(args, state, kwargs.get("model"), kwargs.get("processing_class"), metrics)

    def run_safety(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None,
                   processing_class: Any, metrics: dict[str, float] | None) -> None:
        """Run the safety suite now on the average (and the raw weights in the model, with
        ``evaluate_raw``, unless another average of the group measured them in this round:
        :attr:`raw_share`); its metrics join ``metrics`` and the log."""
        assert self.safety_monitor is not None
        tokenizer = self.tokenizer or processing_class
        if model is None or tokenizer is None:
            raise ValueError("WAvgCallback's safety suite needs the model and a tokenizer (pass tokenizer=...)")
        averager, include_raw = self.averager, self.config.evaluate_raw
        averaged: AbstractContextManager | None = None
        if averager is not None and averager.has_average:
            # Already swapped in (an evaluation of the average): the raw weights are out of reach.
            averaged = nullcontext() if averager.is_swapped_in else averager.swapped_in()
            include_raw = include_raw and not averager.is_swapped_in
        share = self.raw_share
        logged = self.safety_monitor.evaluate(model, tokenizer, averaged, state.global_step, self.safety_data, include_raw,
                                              share.result if share is not None else None)
        if share is not None and share.result is None:
            share.result = self.safety_monitor.last_results.get("raw")
        if metrics is not None:
            metrics.update(logged)
        if self.log_fn is not None:
            self.log_fn(logged)
        else:
            state.log_history.append({**logged, "step": state.global_step})
        if state.is_world_process_zero:
            # One readable table on the console (above any progress bar); every key went to
            # the loggers above.
            tqdm.write(self.safety_monitor.console_table(state.global_step))
            if self.publish_fn is not None:
                self.publish_fn(self.safety_monitor, state.global_step)
        if args.should_save:
            self.safety_monitor.write_report(str(args.output_dir))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        every = self.run_config.refine_every_epochs
        if every and self.averager is not None and self.averager.has_average:
            epoch = round(state.epoch or 0)
            if epoch > 0 and epoch % every == 0:
                self.averager.copy_to_model()
                self._finite_since_check = None  # written from outside the optimizer: check them again
                logger.info("hf_wavg: epoch %d, training continues from the average", epoch)

    def save_state(self, checkpoint_dir: str, args: TrainingArguments, step: int) -> None:
        """Write the averager state into ``checkpoint_dir``; every process calls this (a
        sharded average saves each rank's pieces), the main one writes the record."""
        if self.averager is not None and self._saved_step != step:
            self.averager.save(self.state_dir(checkpoint_dir), write_record=args.should_save)
            self._saved_step = step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # WAvgTrainer has already saved the state, before the Trainer rotated old
        # checkpoints away; other Trainers call back only after rotating.
        checkpoint = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.save_state(checkpoint, args, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.averager is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            # The Trainer has just loaded the best checkpoint's raw weights; the average
            # that was evaluated there comes with them.
            if has_state(self.state_dir(best)):
                self.averager.load(self.state_dir(best))
            else:
                logger.warning("hf_wavg: best checkpoint %s holds no averager state; keeping the last average", best)
        if self.run_config.load_average_at_end and self.averager.has_average:
            self.averager.copy_to_model()
