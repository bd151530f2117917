"""Br35H (Brain Tumor Detection 2020): 2D axial MRI slices labelled tumour / no tumour.

The Kaggle release holds ``yes/`` (tumour) and ``no/`` (healthy) folders of JPG images of varying
size, plus an unlabelled ``pred/`` folder that is ignored. There are no masks, so the task is
classification. It serves SimpleSliceNet's 2D mode and any anomalib image model.

Example:
    >>> from simpleslicenet.data.datamodules import Br35H
    >>> datamodule = Br35H(root="./datasets/Br35H")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from anomalib.data import Folder
from anomalib.data.utils import TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Compose, Resize, Transform

__all__ = ["Br35H"]


class Br35H(Folder):
    """Br35H as an anomalib :class:`~anomalib.data.Folder` datamodule: train on ``no/``, test on both.

    Healthy test images are a seeded ``test_split_ratio`` of ``no/``; validation is a seeded,
    label-aware ``val_split_ratio`` of the test images.

    Args:
        root: Folder holding ``yes/`` and ``no/``.
        normal_dir: Healthy images, relative to ``root``.
        abnormal_dir: Tumour images, relative to ``root``.
        image_size: Size every image is resized to before batching (the images differ in size).
            ``None`` leaves resizing to the model's pre-processor (only safe with a model attached).
        train_batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        num_workers: Data loader workers.
        augmentations: Extra augmentations (applied before the resize).
        test_split_ratio: Share of healthy images held out for testing.
        val_split_ratio: Share of test images moved to validation.
        seed: Seed of the splits.
    """

    def __init__(
        self,
        root: str | Path = "./datasets/Br35H",
        normal_dir: str = "no",
        abnormal_dir: str = "yes",
        image_size: tuple[int, int] | None = (256, 256),
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augmentations: Transform | None = None,
        test_split_ratio: float = 0.2,
        val_split_ratio: float = 0.5,
        seed: int | None = 0,
    ) -> None:
        if image_size is not None:
            resize = Resize(tuple(image_size), antialias=True)
            augmentations = resize if augmentations is None else Compose([augmentations, resize])
        super().__init__(
            name="Br35H",
            root=root,
            normal_dir=normal_dir,
            abnormal_dir=abnormal_dir,
            extensions=(".jpg", ".jpeg", ".png"),
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            test_split_ratio=test_split_ratio,
            val_split_mode=ValSplitMode.FROM_TEST,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.image_size = image_size

    def _setup(self, _stage: str | None = None) -> None:
        root = Path(self.root)
        for folder in (self.normal_dir, self.abnormal_dir):
            if not (root / folder).is_dir():
                needed = f"{self.normal_dir}/ and {self.abnormal_dir}/"
                msg = f"{root / folder}: folder does not exist (Br35H needs {needed})"
                raise FileNotFoundError(msg)
        super()._setup(_stage)

