"""Normal 2-D slices for encoder fine-tuning, normalised exactly as SimpleSliceNet's pre-processor does.

Three sources give the same thing, a stack of ``[0, 1]`` slices:

* a **Br35H** folder (``yes/`` and ``no/``): the training split of the
  :class:`~simpleslicenet.data.datamodules.Br35H` datamodule, i.e. the ``no/`` images minus the healthy
  ones it holds out for testing, resized as that datamodule resizes them;
* any **folder of 2-D images** (PNG, JPG, BMP, TIFF; searched recursively), read as anomalib reads images
  (RGB, divided by 255) and resized to one size;
* the **training split of any datamodule**: for a volumetric one (``BrainPhantom``, ``NiftiFolder``,
  ``IXI``, ...) every axial slice of its healthy training volumes that contains brain; for an image
  datamodule its training images.

:meth:`NormalSlices.batch` repeats grey slices to three channels and applies the ImageNet normalisation of
:func:`simpleslicenet.models.backbones.imagenet_pre_processor`, the transform SimpleSliceNet and the
slice-wise models apply, so the encoder is fine-tuned on the inputs it will later see.

Batches are drawn without state: the slices of step ``t`` follow from ``(seed, t)`` alone
(:func:`batch_indices`), which is what makes an interrupted run resume exactly.

Example:
    >>> from simpleslicenet.training.data import load_normal_slices
    >>> slices = load_normal_slices("BrainPhantom", {"n_healthy": 6, "n_lesion": 4})  # doctest: +SKIP
    >>> slices.batch(slices.indices_for_step(0, batch_size=4, seed=0)).shape  # doctest: +SKIP
    torch.Size([4, 3, 96, 96])
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from simpleslicenet.atomic import TEMP_PREFIX
from simpleslicenet.models.backbones import imagenet_pre_processor

__all__ = [
    "EDC_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "NormalSlices",
    "batch_indices",
    "imagenet_normalise",
    "load_normal_slices",
    "slices_from_datamodule",
    "slices_from_image_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The image size of EDC's Br35H experiments; used for 2-D images when no size is given.
EDC_IMAGE_SIZE = (256, 256)


@lru_cache(maxsize=1)
def _normalise_transform():  # noqa: ANN202
    return imagenet_pre_processor(None).transform


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """What SimpleSliceNet's pre-processor does to a batch of ``[0, 1]`` slices ``[N, 3, H, W]``."""
    return _normalise_transform()(images)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the items in batch ``step``: consecutive slices of seeded random epochs.

    The item stream is one permutation of all items per epoch (epoch ``e`` seeded by ``(seed, e)``),
    cut into batches of ``batch_size``; a batch may span two epochs. Nothing depends on earlier calls.

    Args:
        n_items: Number of items.
        batch_size: Items per batch.
        step: Zero-based step number.
        seed: Seed of the permutations.

    Raises:
        ValueError: If there are no items or the batch size is not positive.
    """
    if n_items < 1 or batch_size < 1:
        msg = f"need at least one item and a positive batch size, got {n_items} items, batch {batch_size}"
        raise ValueError(msg)
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n_items
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        permutation = torch.randperm(n_items, generator=generator)
        chosen = epochs == epoch
        out[chosen] = permutation[positions[chosen] % n_items]
    return out


@dataclass
class NormalSlices:
    """A stack of normal slices in ``[0, 1]``, kept grey (one channel) when the source was grey.

    Args:
        images: ``[N, C, H, W]`` float32, ``C`` 1 (grey) or 3.
        source: Where the slices came from (for logs and the run summary).
    """

    images: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] not in (1, 3) or self.images.shape[0] == 0:
            msg = f"NormalSlices needs a non-empty [N, 1 or 3, H, W] stack, got {tuple(self.images.shape)}"
            raise ValueError(msg)
        self.images = self.images.float().contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every slice."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def indices_for_step(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The slices of training step ``step`` (see :func:`batch_indices`)."""
        return batch_indices(len(self), batch_size, step, seed)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Slices ``indices`` as model input: three channels, ImageNet-normalised, ``[B, 3, H, W]``."""
        images = self.images[indices]
        return imagenet_normalise(images.expand(-1, 3, -1, -1).contiguous())

    def fingerprint(self) -> str:
        """SHA-1 of the stack's shape and values; a resumed run must see the same slices."""
        digest = hashlib.sha1(str(tuple(self.images.shape)).encode())
        digest.update(self.images.numpy().tobytes())
        return digest.hexdigest()


def _as_stack(images: list[torch.Tensor], source: str) -> NormalSlices:
    stack = torch.cat(images) if images else torch.empty(0, 1, 1, 1)
    if stack.shape[0] and stack.shape[1] == 3 and torch.equal(stack[:, :1].expand_as(stack), stack):
        stack = stack[:, :1]  # grey repeated to RGB: keep one channel, repeat per batch
    if stack.shape[0] == 0:
        msg = f"{source}: no normal slices found"
        raise ValueError(msg)
    return NormalSlices(stack.contiguous(), source=source)


def _resize(images: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, list(size), antialias=True)


def slices_from_image_folder(folder: str | Path, image_size: Sequence[int] | None = None) -> NormalSlices:
    """Every image under ``folder`` (recursively; hidden files skipped), resized to ``image_size``.

    Args:
        folder: Folder of normal 2-D slice images.
        image_size: ``(H, W)``; ``None`` means :data:`EDC_IMAGE_SIZE`, since images of a folder may differ in size.

    Raises:
        FileNotFoundError: If ``folder`` holds no image.
    """
    from anomalib.data.utils import read_image

    folder = Path(folder)
    paths = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith((".", TEMP_PREFIX))
    )
    if not paths:
        msg = f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found"
        raise FileNotFoundError(msg)
    size = tuple(image_size) if image_size is not None else EDC_IMAGE_SIZE
    images = [_resize(read_image(p, as_tensor=True), size)[None] for p in paths]
    return _as_stack(images, str(folder))


def _is_volume_item(item: Any) -> bool:
    return getattr(item, "brain_mask", None) is not None and getattr(item, "image", None) is not None and item.image.dim() == 4


def slices_from_datamodule(datamodule: Any, image_size: Sequence[int] | None = None) -> NormalSlices:
    """The training split of ``datamodule`` as slices: brain-containing slices of volumes, or its images.

    Only ``train_data`` is read, which for every datamodule of this package holds healthy scans only.

    Args:
        datamodule: An anomalib datamodule (volumetric or 2-D); prepared and set up here if needed.
        image_size: Resize slices to ``(H, W)``; ``None`` keeps the datamodule's size (what the
            models are trained on).

    Raises:
        ValueError: If the training split yields no slice.
    """
    if getattr(datamodule, "train_data", None) is None:
        datamodule.prepare_data()
        datamodule.setup()
    dataset = datamodule.train_data
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        image = torch.as_tensor(item.image).float()
        if _is_volume_item(item):
            # Slices without brain carry no anatomy; training models skip them too.
            image = image[torch.as_tensor(item.brain_mask).flatten(1).any(dim=1)]
        elif image.dim() == 3:
            image = image[None]
        images.append(_resize(image, image_size))
    return _as_stack(images, f"{type(datamodule).__name__} training split")


def _datamodule_class(name: str) -> type:
    """A datamodule class by dotted path, by this package's short name, or by anomalib's."""
    if "." in name:
        module_name, attribute = name.rsplit(".", 1)
        return getattr(importlib.import_module(module_name), attribute)
    for module_name in ("simpleslicenet.data.datamodules", "anomalib.data"):
        cls = getattr(importlib.import_module(module_name), name, None)
        if isinstance(cls, type):
            return cls
    msg = f"unknown datamodule {name!r}: give a folder, a datamodule YAML, a class name (BrainPhantom) or a dotted path"
    raise ValueError(msg)


def _build_datamodule(class_path: str, init_args: Mapping[str, Any]):
    cls = _datamodule_class(class_path)
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in init_args.items()}
    accepted = inspect.signature(cls).parameters
    if "progress" in accepted and "progress" not in args:
        args["progress"] = False  # the fine-tuning run has its own progress bar
    return cls(**args)


def load_normal_slices(
    data: Any,
    data_args: Mapping[str, Any] | None = None,
    image_size: Sequence[int] | None = None,
) -> NormalSlices:
    """Normal slices from a folder, a datamodule YAML, a datamodule name, or a datamodule object.

    Args:
        data: A Br35H folder (holding ``yes/`` and ``no/``), a folder of images, a YAML file with
            ``class_path`` / ``init_args`` of a datamodule, a datamodule class name (``BrainPhantom``) or
            dotted path, or a datamodule instance.
        data_args: Init arguments for a datamodule given by name (merged over a YAML's ``init_args``).
        image_size: ``(H, W)`` to resize to; ``None``: the datamodule's own size, or
            :data:`EDC_IMAGE_SIZE` for Br35H and image folders.

    Raises:
        FileNotFoundError: If a folder holds no images.
        ValueError: If a name resolves to no datamodule or no slice is found.
    """
    data_args = dict(data_args or {})
    if not isinstance(data, (str, Path)):
        return slices_from_datamodule(data, image_size)
    path = Path(data)
    if path.is_dir():
        if (path / "no").is_dir() and (path / "yes").is_dir():
            size = tuple(image_size) if image_size is not None else EDC_IMAGE_SIZE
            datamodule = _build_datamodule("Br35H", {"root": path, "image_size": size, **data_args})
            return slices_from_datamodule(datamodule)
        return slices_from_image_folder(path, image_size)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
        if "class_path" not in config:
            msg = f"{path}: a datamodule YAML needs class_path (and optionally init_args)"
            raise ValueError(msg)
        datamodule = _build_datamodule(config["class_path"], {**(config.get("init_args") or {}), **data_args})
        return slices_from_datamodule(datamodule, image_size)
    return slices_from_datamodule(_build_datamodule(str(data), data_args), image_size)
