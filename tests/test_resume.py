"""An interrupted training resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import PHANTOM_KWARGS, TINY_SIMPLESLICENET, tiny_engine
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException

from simpleslicenet.data.datamodules.phantom import BrainPhantom
from simpleslicenet.deploy.loading import read_checkpoint
from simpleslicenet.models.simpleslicenet import SimpleSliceNet

pytestmark = pytest.mark.slow

EPOCHS = 3


class TerminateAtStep(Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler or ``kill`` would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *_args, **_kwargs) -> None:  # noqa: ANN001, ANN002, ANN003, D102
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _datamodule(root: Path) -> BrainPhantom:
    return BrainPhantom(root=root, target_shape=(32, 32, 16), progress=False, **PHANTOM_KWARGS)


def _train(work: Path, phantom_root: Path, ckpt_path: Path | None = None, callbacks: tuple = ()) -> tuple:
    seed_everything(0)
    model = SimpleSliceNet(**TINY_SIMPLESLICENET)
    engine = tiny_engine(work, max_epochs=EPOCHS, callbacks=list(callbacks))
    datamodule = _datamodule(phantom_root)
    engine.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    (metrics,) = engine.test(model, datamodule=datamodule)
    return metrics, engine


def test_sigterm_mid_epoch_then_ckpt_path_gives_the_uninterrupted_metrics(phantom_root: Path, tmp_path: Path) -> None:
    expected, uninterrupted = _train(tmp_path / "uninterrupted", phantom_root)
    steps_per_epoch = uninterrupted.trainer.global_step // EPOCHS
    assert steps_per_epoch >= 2  # so that the kill below lands inside an epoch

    stop_at = 2 * steps_per_epoch + steps_per_epoch // 2  # in the middle of the last epoch
    with pytest.raises(SIGTERMException):
        _train(tmp_path / "interrupted", phantom_root, callbacks=(TerminateAtStep(stop_at),))
    (checkpoint,) = (tmp_path / "interrupted").rglob("model.ckpt")
    loaded = read_checkpoint(checkpoint)  # resumable without running code from the file
    assert not loaded.ran_code
    assert loaded.checkpoint["epoch"] == 1 and loaded.checkpoint["global_step"] == 2 * steps_per_epoch

    resumed_metrics, resumed = _train(tmp_path / "resumed", phantom_root, ckpt_path=checkpoint)
    assert resumed.trainer.global_step == uninterrupted.trainer.global_step
    assert resumed_metrics == expected
