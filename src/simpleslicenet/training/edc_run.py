"""Run EDC fine-tuning with a Lightning ``Trainer`` and write the tuned encoder.

:func:`train_edc` trains :class:`~simpleslicenet.training.edc_module.EDCModule` for ``max_steps`` steps
with ``gradient_clip_val``, saves a ``ModelCheckpoint`` every ``checkpoint_every`` steps (one Lightning
epoch), and resumes from it with ``ckpt_path``: rerunning with the same settings and data continues from
the last saved step and gives the same weights as an uninterrupted run (bit for bit on the CPU). A
finished run can be extended by asking for more ``steps``.

Example:
    >>> from simpleslicenet.training import EDCSettings, load_normal_slices, train_edc
    >>> slices = load_normal_slices("BrainPhantom", {"n_healthy": 24, "n_lesion": 16})  # doctest: +SKIP
    >>> result = train_edc(slices, "encoder.pth", EDCSettings(steps=4000))  # doctest: +SKIP
    >>> result.weights, result.loss_curve  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import signal
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tqdm.auto import tqdm

from simpleslicenet.quiet import quiet_lightning_messages
from simpleslicenet.atomic import atomic_path
from simpleslicenet.training.data import NormalSlices
from simpleslicenet.training.edc import EDCResumeError, EDCSettings, initial_encoder_state, state_fingerprint
from simpleslicenet.training.edc_module import CHECKPOINT_FORMAT, EDCModule, StepBatches
from simpleslicenet.training.outputs import (
    check_encoder_weights,
    output_paths,
    save_encoder_weights,
    write_loss_curve,
    write_summary,
)

__all__ = ["EDCResult", "train_edc"]

logger = logging.getLogger(__name__)


@dataclass
class EDCResult:
    """What :func:`train_edc` produced.

    Attributes:
        weights: The encoder weights file (``backbone_weights=`` of the models).
        checkpoint: The resume checkpoint (a Lightning checkpoint).
        loss_curve: The loss curve PNG.
        summary: The JSON summary.
        steps: Steps trained in total.
        resumed_from: Step the run continued from (0: fresh start).
        history: ``loss`` per step, ``stage_loss`` per step, ``drift_step``/``drift``, ``anchor``.
    """

    weights: Path
    checkpoint: Path
    loss_curve: Path
    summary: Path
    steps: int
    resumed_from: int
    history: dict[str, list] = field(default_factory=dict)


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its destination and renames it there: an interrupted save keeps the old one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:  # noqa: ANN401, ARG002
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)


class _EDCCheckpoint(ModelCheckpoint):
    """The one resume checkpoint of a run, replaced at the end of every epoch (``checkpoint_every`` steps)."""

    FILE_EXTENSION = ".pt"

    def __init__(self, path: Path) -> None:
        super().__init__(
            dirpath=path.parent,
            filename=path.name.removesuffix(self.FILE_EXTENSION),
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )


class _Progress(Callback):
    """A step progress bar, the caller's ``on_step``, the loss curve at each checkpoint, and interruptions."""

    def __init__(self, total: int, enabled: bool, on_step: Callable[[int, float], None] | None, draw: Callable[[], None]) -> None:
        self.total, self.enabled, self.on_step, self.draw = total, enabled, on_step, draw
        self.bar: tqdm | None = None
        self.exception: BaseException | None = None

    def on_train_start(self, trainer: Trainer, pl_module: EDCModule) -> None:  # noqa: ARG002
        self.bar = tqdm(
            total=self.total, initial=trainer.global_step, desc="EDC", unit="step", disable=not self.enabled, dynamic_ncols=True
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: EDCModule, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        loss = pl_module.history["loss"][-1]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.on_step is not None:
            self.on_step(trainer.global_step, loss)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: EDCModule) -> None:  # noqa: ARG002
        self.draw()

    def on_train_end(self, trainer: Trainer, pl_module: EDCModule) -> None:  # noqa: ARG002
        if self.bar is not None:
            self.bar.close()

    def on_exception(self, trainer: Trainer, pl_module: EDCModule, exception: BaseException) -> None:  # noqa: ARG002
        self.exception = exception
        if self.bar is not None:
            self.bar.close()


def _accelerator(device: str) -> dict[str, Any]:
    """Trainer arguments for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_device = torch.device(device)
    if run_device.type == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    if run_device.type == "cuda":
        return {"accelerator": "gpu", "devices": [run_device.index or 0]}
    return {"accelerator": run_device.type, "devices": 1}


def _check_resume(checkpoint: Path, key: Mapping[str, Any], steps: int) -> int:
    """The step a checkpoint continues from, after checking that it belongs to this run."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"{checkpoint}: cannot read the EDC checkpoint ({error}); delete it or pass --restart"
        raise EDCResumeError(msg) from error
    state = saved.get("edc") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        msg = f"{checkpoint}: not an EDC checkpoint of this version; delete it or pass --restart (restart=True)"
        raise EDCResumeError(msg)
    differences = [
        f"{name}: checkpoint {state['key'].get(name)!r}, now {value!r}"
        for name, value in key.items()
        if state["key"].get(name) != value
    ]
    if differences:
        msg = (
            f"{checkpoint}: checkpoint of a different run ({'; '.join(differences)}). Use the same settings and "
            "data to resume, or pass --restart (restart=True) to start again."
        )
        raise EDCResumeError(msg)
    step = int(saved["global_step"])
    if step > steps:
        msg = f"{checkpoint}: already at step {step}, more than steps={steps}; pass --restart"
        raise EDCResumeError(msg)
    return step


def _fit(trainer: Trainer, module: EDCModule, batches: StepBatches, ckpt_path: Path | None, progress: _Progress) -> None:
    """``trainer.fit``, with a Ctrl+C (or an ``on_step`` that raises it) surfacing as ``KeyboardInterrupt``.

    Lightning turns an interruption into ``sys.exit(1)`` and leaves SIGINT ignored for the rest of the
    process; the caller of a function expects neither.
    """
    quiet_lightning_messages()
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with warnings.catch_warnings():
            # The checkpoint lies beside the weights file, in a folder that usually holds other files.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, train_dataloaders=batches, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if isinstance(progress.exception, KeyboardInterrupt):
            raise progress.exception from None
        raise
    finally:
        if main_thread and sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def train_edc(
    slices: NormalSlices,
    out: str | os.PathLike,
    settings: EDCSettings | None = None,
    *,
    checkpoint_every: int = 100,
    drift_every: int = 50,
    device: str = "auto",
    restart: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> EDCResult:
    """Fine-tune ``settings.backbone`` with EDC on ``slices`` and write the encoder weights to ``out``.

    Args:
        slices: Normal training slices (:func:`~simpleslicenet.training.data.load_normal_slices`).
        out: Encoder weights file, ``.pth``/``.pt`` or ``.safetensors``; the checkpoint, loss curve and
            summary go beside it (:func:`~simpleslicenet.training.outputs.output_paths`).
        settings: Run settings; ``None`` for EDC's Br35H defaults.
        checkpoint_every: Save the resume checkpoint (and redraw the loss curve) every this many steps
            and at the last step.
        drift_every: Measure the drift from the starting encoder every this many steps.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``. A run resumes bit for
            bit on the same CPU set-up; GPU kernels may differ in the last bits.
        restart: Ignore an existing checkpoint and start from the starting weights.
        progress: Show a progress bar.
        on_step: Called as ``on_step(step, loss)`` after each step.

    Returns:
        Paths of the written files and the loss history.

    Raises:
        EDCResumeError: If a checkpoint beside ``out`` belongs to another run or is past ``settings.steps``.
        BackboneWeightsError: If the starting weights cannot be had or the written file does not load strictly.
        FloatingPointError: If the loss stops being finite.
        ValueError: For an invalid output name or stage list.
    """
    settings = settings or EDCSettings()
    if checkpoint_every < 1 or drift_every < 1:
        msg = f"checkpoint_every and drift_every must be positive, got {checkpoint_every}, {drift_every}"
        raise ValueError(msg)
    paths = output_paths(Path(out))
    start_state = initial_encoder_state(settings.backbone, settings.backbone_weights)
    key = {
        "settings": settings.resume_key(),
        "weights_sha1": state_fingerprint(start_state),
        "data_sha1": slices.fingerprint(),
        "n_slices": len(slices),
    }
    resume_from, start_step = None, 0
    if paths["checkpoint"].exists() and not restart:
        start_step = _check_resume(paths["checkpoint"], key, settings.steps)
        resume_from = paths["checkpoint"]
        logger.info("EDC: resuming %s from step %d", paths["checkpoint"], start_step)
    module = EDCModule(settings, start_state, resume_key=key, drift_every=drift_every)
    del start_state
    title = f"EDC {settings.backbone}, {len(slices)} slices {slices.image_size[0]}×{slices.image_size[1]}"

    def draw() -> None:
        write_loss_curve(module.history, paths["loss_curve"], title)

    watcher = _Progress(settings.steps, progress, on_step, draw)
    trainer = Trainer(
        **_accelerator(device),
        max_steps=settings.steps,
        max_epochs=-1,
        gradient_clip_val=settings.grad_clip or None,
        gradient_clip_algorithm="norm",
        callbacks=[watcher, _EDCCheckpoint(paths["checkpoint"])],
        plugins=[_AtomicCheckpointIO()],
        default_root_dir=paths["weights"].parent,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    _fit(trainer, module, StepBatches(slices, module, checkpoint_every), resume_from, watcher)
    if start_step == settings.steps:  # nothing left to train: the curve of the finished run
        draw()

    history = module.history
    save_encoder_weights(
        module.network.encoder.state_dict(),
        paths["weights"],
        metadata={"backbone": settings.backbone, "method": "EDC", "steps": str(settings.steps)},
    )
    n_tensors = check_encoder_weights(paths["weights"], settings.backbone)
    tail = history["loss"][-min(50, len(history["loss"])) :]
    write_summary(
        paths["summary"],
        {
            "method": "EDC (Guo et al., IEEE TMI 2023)",
            "weights": paths["weights"].name,
            "tensors": n_tensors,
            "settings": dataclasses.asdict(settings),
            "stage_indices": list(module.network.stage_indices),
            "bottleneck_index": module.network.bottleneck_index,
            "data": {"source": slices.source, "n_slices": len(slices), "image_size": list(slices.image_size), "sha1": key["data_sha1"]},
            "starting_weights_sha1": key["weights_sha1"],
            "steps": settings.steps,
            "resumed_from": start_step,
            "train_seconds": module.train_seconds,
            "device": str(trainer.strategy.root_device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "first_loss": history["loss"][0] if history["loss"] else None,
            "final_loss_mean_last_50": sum(tail) / len(tail) if tail else None,
            "final_drift": history["drift"][-1] if history["drift"] else None,
            "history": history,
        },
    )
    return EDCResult(
        weights=paths["weights"],
        checkpoint=paths["checkpoint"],
        loss_curve=paths["loss_curve"],
        summary=paths["summary"],
        steps=settings.steps,
        resumed_from=start_step,
        history=history,
    )
