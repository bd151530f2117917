"""EDC fine-tuning as a Lightning module: the network, its loss and optimiser, and the batches of each step.

:class:`EDCModule` wraps :class:`~simpleslicenet.training.edc.EDCNetwork`; a Lightning ``Trainer`` runs it
(:func:`~simpleslicenet.training.edc_run.train_edc` sets one up). The batch of step ``t`` follows from
``(seed, t)`` alone (:func:`~simpleslicenet.training.data.batch_indices`); :class:`StepBatches` serves the
batches from the trainer's current step on, so a run resumed from a checkpoint sees exactly the batches
the uninterrupted run saw. The loss history and the training time travel in the checkpoint with the weights.

Example:
    >>> from lightning.pytorch import Trainer
    >>> module = EDCModule(EDCSettings(steps=100), initial_encoder_state("tf_efficientnet_lite0", "imagenet"))  # doctest: +SKIP
    >>> trainer = Trainer(max_steps=100, gradient_clip_val=1.0, logger=False)  # doctest: +SKIP
    >>> trainer.fit(module, train_dataloaders=StepBatches(slices, module))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule

from simpleslicenet.training.data import NormalSlices
from simpleslicenet.training.edc import EDCNetwork, EDCSettings

__all__ = ["CHECKPOINT_FORMAT", "EDCModule", "StepBatches", "empty_history"]

# Marks the run's own entry in a Lightning checkpoint (resume key, loss history, time).
CHECKPOINT_FORMAT = "simpleslicenet-edc-lightning-v1"


def empty_history() -> dict[str, list]:
    """``loss`` and ``stage_loss`` per step, ``anchor`` per step, ``drift`` at the steps in ``drift_step``."""
    return {"loss": [], "stage_loss": [], "anchor": [], "drift_step": [], "drift": []}


class EDCModule(LightningModule):
    """Encoder–decoder contrast on batches of normal slices.

    Args:
        settings: The run's settings.
        encoder_state: Starting weights of the whole timm model.
        resume_key: What a checkpoint must match to be resumed (settings, starting weights, data); it is
            stored in every checkpoint.
        drift_every: Measure the drift from the starting encoder every this many steps (and at the last).
    """

    def __init__(
        self,
        settings: EDCSettings,
        encoder_state: Mapping[str, torch.Tensor],
        resume_key: Mapping[str, Any] | None = None,
        drift_every: int = 50,
    ) -> None:
        super().__init__()
        if drift_every < 1:
            msg = f"drift_every must be positive, got {drift_every}"
            raise ValueError(msg)
        self.settings = settings
        self.network = EDCNetwork(settings, encoder_state)
        self.resume_key = dict(resume_key or {})
        self.drift_every = int(drift_every)
        self.history = empty_history()
        self.train_seconds = 0.0
        self._step_began = 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with EDC's two learning rates (encoder low, decoder high), constant."""
        return self.network.make_optimizer(self.settings)

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:  # noqa: ARG002
        self._step_began = time.perf_counter()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        """Loss of one batch; stage losses and the anchor term go to :attr:`history`."""
        terms = self.network(batch)
        loss = float(terms.loss.detach())
        if not math.isfinite(loss):
            msg = f"EDC: loss became {loss} at step {self.global_step + 1}; lower the learning rates"
            raise FloatingPointError(msg)
        self.history["loss"].append(loss)
        self.history["stage_loss"].append(terms.stage_losses)
        self.history["anchor"].append(terms.anchor)
        return terms.loss

    def on_train_batch_end(self, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        # global_step already counts this batch's optimiser step here.
        done = self.global_step
        if done % self.drift_every == 0 or done == self.settings.steps:
            self.history["drift_step"].append(done)
            self.history["drift"].append(self.network.drift(batch))
        self.train_seconds += time.perf_counter() - self._step_began

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["edc"] = {
            "format": CHECKPOINT_FORMAT,
            "key": self.resume_key,
            "history": self.history,
            "seconds": self.train_seconds,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("edc") or {}
        self.history = {**empty_history(), **state.get("history", {})}
        self.train_seconds = float(state.get("seconds", 0.0))


class StepBatches:
    """The batches of the steps from the trainer's current step on, at most ``per_epoch`` of them.

    One pass is one Lightning epoch. Reading the start from the trainer when a pass begins makes a run
    resumed from an epoch-end checkpoint continue with the very next batch.

    Args:
        slices: The normal slices.
        module: The module being trained (its trainer's ``global_step`` is the next step's number).
        per_epoch: Steps per epoch (the checkpoint interval).
    """

    def __init__(self, slices: NormalSlices, module: EDCModule, per_epoch: int) -> None:
        if per_epoch < 1:
            msg = f"per_epoch must be positive, got {per_epoch}"
            raise ValueError(msg)
        self.slices = slices
        self.module = module
        self.per_epoch = int(per_epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        settings = self.module.settings
        start = self.module.global_step  # read when the pass begins, not when the iterator is made
        for step in range(start, min(start + self.per_epoch, settings.steps)):
            yield self.slices.batch(self.slices.indices_for_step(step, settings.batch_size, settings.seed))
