"""Checkpoint selection on the validation slice AUROC, as the authors' code does (an optimistic protocol).

The authors evaluate every few epochs on labelled tumour volumes and keep the checkpoint with the best
slice AUROC. That uses lesion labels to pick the model, which an unsupervised detector deployed on new
scans does not have, so results obtained this way are optimistic; every table that reports them says
so. The package's default keeps the last epoch.

Example:
    >>> from anomalib.engine import Engine
    >>> from simpleslicenet.training.selection import ValidationSliceAUROCCheckpoint
    >>> engine = Engine(max_epochs=30, callbacks=[ValidationSliceAUROCCheckpoint(every_n_epochs=6)])  # doctest: +SKIP
    >>> engine.fit(model, datamodule=datamodule)  # doctest: +SKIP
    >>> engine.test(model, datamodule=datamodule, ckpt_path="best")  # doctest: +SKIP

or ``anomalib train ... --trainer.callbacks+=simpleslicenet.training.selection.ValidationSliceAUROCCheckpoint``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["ValidationSliceAUROCCheckpoint", "MONITOR", "PROTOCOL_LABEL"]

# Logged by the volumetric evaluator on the validation split.
MONITOR = "val_slice_AUROC"
# How tables name results of checkpoints chosen this way.
PROTOCOL_LABEL = "val-selected (authors' protocol, optimistic)"


class ValidationSliceAUROCCheckpoint(ModelCheckpoint):
    """Keeps the checkpoint with the highest validation slice AUROC, checked every ``every_n_epochs``.

    Args:
        every_n_epochs: Epochs between checks (the authors' 6). Validation must run at those epochs
            (``check_val_every_n_epoch`` dividing it, the default 1 does).
        dirpath: Folder of the checkpoint (default: the trainer's checkpoint folder).
    """

    def __init__(self, every_n_epochs: int = 6, dirpath: str | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="selected-{epoch}",
            monitor=MONITOR,
            mode="max",
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            auto_insert_metric_name=False,
        )
