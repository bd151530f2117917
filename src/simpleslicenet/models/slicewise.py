"""Slice-wise baselines: any anomalib image model run on the axial slices of whole volumes.

A :class:`~simpleslicenet.data.batch.VolumeBatch` is just ``D`` images per volume, so an anomalib
image model trains on the slices of healthy volumes unchanged. What a volume needs on top is done
here, in a thin subclass made by :func:`slicewise`:

* **training** sees only the slices that hold brain, every ``train_slice_stride``-th one
  (neighbouring slices are near duplicates, and PatchCore's memory bank grows with every slice);
* **validation / test / predict** keep the wrapped model's per-slice maps and scores; the stacked
  maps of a volume are its 3D anomaly map ``[D, H, W]`` and :func:`~simpleslicenet.models.volume_ops.volume_score`
  of that map (inside the brain mask) is set on every row of the volume as ``volume_score``;
* the **pre-processor** only applies ImageNet normalisation (no resize), so maps stay at slice size;
  with ``image_size`` it resizes first, as anomalib's own models do, and maps come out at that size;
* the **visualizer** writes NIfTI maps (:class:`~simpleslicenet.visualization.VolumeMapWriter`):
  anomalib's ``ImageVisualizer`` re-opens ``image_path`` with PIL, which cannot read NIfTI;
* the **evaluator** reports volumetric metrics (:mod:`simpleslicenet.metrics`);
* **offline weights**: timm cannot download here, so the wrapped model is built with
  ``pre_trained=False`` and ImageNet weights bundled with
  :mod:`simpleslicenet.models.backbones` are loaded into its timm feature extractor
  (``backbone_weights="imagenet"``, default backbone ``tf_efficientnet_lite0``). ``"random"`` keeps
  the random initialisation; the choice is kept as the hyper-parameter ``backbone_weights``.

Everything else (losses, optimisers, memory banks and the hooks that fill them, export) is the
wrapped model's own.

Memory note: PatchCore's k-center-greedy loop grows the glibc heap by ~12 MB a step on CPU until the
process is killed, because each step frees and re-allocates a large distance buffer just below
glibc's dynamic mmap threshold. Importing this module lowers that threshold to 8 MiB
(``mallopt(M_MMAP_THRESHOLD)``), so large buffers are returned to the system when freed. It is a
no-op on platforms without glibc.

Example:
    >>> from anomalib.engine import Engine
    >>> from simpleslicenet.models.slicewise import PatchcoreSlices, slicewise
    >>> from anomalib.models import Dfkde
    >>> model = PatchcoreSlices(train_slice_stride=3)
    >>> DfkdeSlices = slicewise(Dfkde)  # any anomalib image model
    >>> engine = Engine(accelerator="cpu")
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> predictions = engine.predict(model=model, datamodule=datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import logging
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.models import Cflow, Fastflow, Padim, Patchcore, ReverseDistillation
from anomalib.models.components import AnomalibModule
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from anomalib.models.image.cflow.anomaly_map import AnomalyMapGenerator as CflowAnomalyMapGenerator
from anomalib.pre_processing import PreProcessor
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.data.batch import VolumeBatch
from simpleslicenet.models.backbones import imagenet_pre_processor
from simpleslicenet.models.volume_model import VolumeModelMixin
from simpleslicenet.models.volume_ops import restrict_to_brain, volume_score

__all__ = [
    "SliceWiseMixin",
    "slicewise",
    "volume_maps",
    "LikelihoodMapGenerator",
    "take_rows",
    "PatchcoreSlices",
    "CflowSlices",
    "PadimSlices",
    "FastflowSlices",
    "ReverseDistillationSlices",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
]

logger = logging.getLogger(__name__)


# EfficientNet-Lite0 has bundled ImageNet weights; blocks.2 is stride 8 (40 ch), blocks.4 stride 16 (112 ch),
# the same strides as layer2/layer3 of the ResNets used in the papers.
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_LAYERS = ("blocks.2", "blocks.4")
BACKBONE_WEIGHTS = ("imagenet", "random")

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def _limit_heap_growth(threshold_bytes: int = 8 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with mmap so they go back to the system when freed."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


HEAP_LIMITED = _limit_heap_growth()


def take_rows(batch: Any, rows: torch.Tensor) -> Any:  # noqa: ANN401
    """A new batch of the same class holding only ``rows`` (boolean or index tensor) of every field."""
    index = rows.nonzero().flatten().tolist() if rows.dtype == torch.bool else rows.tolist()
    size = batch.batch_size
    changes = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            changes[field.name] = value[index]
        elif isinstance(value, list) and len(value) == size:
            changes[field.name] = [value[i] for i in index]
    return dataclasses.replace(batch, **changes)


def volume_maps(batch: VolumeBatch) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(volume_index, anomaly_map [D, H, W], volume_score)`` for each volume of a predicted batch."""
    maps = _as_slice_maps(batch.anomaly_map)
    out = []
    for index, rows in batch.volumes():
        score = batch.volume_score[rows.start] if batch.volume_score is not None else None
        out.append((index, maps[rows], score))
    return out


def _as_slice_maps(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Anomaly maps as ``[N, H, W]`` whether a model returned ``[N, 1, H, W]`` or ``[N, H, W]``."""
    return anomaly_map[:, 0] if anomaly_map.dim() == 4 else anomaly_map


def load_offline_weights(model: torch.nn.Module, owner: str) -> list[str]:
    """Load bundled ImageNet weights into every frozen timm feature extractor inside ``model``.

    Trainable extractors (e.g. STFPM's student) keep their random start, as in the original methods.

    Args:
        model: The wrapped torch model.
        owner: Class name used in error messages.

    Returns:
        The backbone names that received weights.

    Raises:
        ValueError: If the model has no timm feature extractor, or a backbone has no bundled weights.
    """
    from simpleslicenet.models.backbones import BackboneWeightsError, apply_imagenet_weights  # noqa: PLC0415

    loaded = []
    for module in model.modules():
        if not isinstance(module, TimmFeatureExtractor) or module.requires_grad:
            continue
        if not isinstance(module.backbone, str):
            continue
        try:
            # A features_only network lacks the classifier head; every tensor it has must be filled.
            apply_imagenet_weights(module.feature_extractor, module.backbone)
        except BackboneWeightsError as error:
            msg = f"{owner}: {error}; use backbone={DEFAULT_BACKBONE!r} or pass backbone_weights='random'"
            raise ValueError(msg) from error
        loaded.append(module.backbone)
    if not loaded:
        msg = f"{owner}: found no frozen timm feature extractor to load ImageNet weights into; pass backbone_weights='random'"
        raise ValueError(msg)
    return loaded


class SliceWiseMixin(VolumeModelMixin):
    """Adds volume handling to an anomalib image model; put it first in the bases (see :func:`slicewise`).

    Args:
        train_slice_stride: Train on every k-th slice of each volume (``1``: all slices).
        brain_slices_only: Train only on slices that contain brain.
        volume_score_mode: ``"max"`` or ``"topk_mean"`` of the volume's voxel map inside the brain.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        backbone_weights: ``"imagenet"`` (bundled offline weights) or ``"random"``.
        image_size: Resize slices to ``(H, W)`` in the pre-processor (``None``: keep slice size).
            Models such as FastFlow and Reverse Distillation need a fixed size.
        **kwargs: Arguments of the wrapped anomalib model.
    """

    def __init__(
        self,
        *,
        train_slice_stride: int = 1,
        brain_slices_only: bool = True,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        backbone_weights: str = "imagenet",
        image_size: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        name = type(self).__name__
        if int(train_slice_stride) < 1:
            msg = f"{name}: train_slice_stride must be >= 1, got {train_slice_stride}"
            raise ValueError(msg)
        if volume_score_mode not in {"max", "topk_mean"}:
            msg = f"{name}: volume_score_mode must be 'max' or 'topk_mean', got {volume_score_mode!r}"
            raise ValueError(msg)
        if backbone_weights not in BACKBONE_WEIGHTS:
            msg = f"{name}: backbone_weights must be one of {BACKBONE_WEIGHTS}, got {backbone_weights!r}"
            raise ValueError(msg)
        parameters = inspect.signature(super().__init__).parameters
        if "pre_trained" in parameters:
            # timm would download weights from the model hub; bundled ones are loaded below instead.
            kwargs["pre_trained"] = False
        if image_size is not None and kwargs.get("pre_processor", True) is True:
            kwargs["pre_processor"] = self.configure_pre_processor(tuple(image_size))
        try:
            super().__init__(**kwargs)
        except ValueError as error:
            if image_size is None and "input size" in str(error):
                msg = f"{name}: {error} Pass image_size=(H, W), e.g. the datamodule's slice size."
                raise ValueError(msg) from error
            raise
        self.train_slice_stride = int(train_slice_stride)
        self.brain_slices_only = bool(brain_slices_only)
        self.volume_score_mode = volume_score_mode
        self.topk_fraction = float(topk_fraction)
        self.backbone_weights = backbone_weights
        if backbone_weights == "imagenet":
            loaded = load_offline_weights(self.model, name)
            logger.info("%s: offline ImageNet weights loaded into %s", name, ", ".join(loaded))

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """ImageNet normalisation of the ``[0, 1]`` slices; no resize unless ``image_size`` is given.

        Args:
            image_size: Optional ``(H, W)`` to resize slices to before normalising.
        """
        return imagenet_pre_processor(image_size)

    def training_slices(self, batch: Any) -> Any:  # noqa: ANN401
        """The rows of ``batch`` used for training: brain slices, every ``train_slice_stride``-th one."""
        keep = torch.ones(batch.batch_size, dtype=torch.bool, device=batch.image.device)
        slice_index = getattr(batch, "slice_index", None)
        if slice_index is not None and self.train_slice_stride > 1:
            keep &= slice_index % self.train_slice_stride == 0
        brain_mask = getattr(batch, "brain_mask", None)
        if brain_mask is not None and self.brain_slices_only:
            has_brain = brain_mask.flatten(1).any(dim=1)
            # A volume with no brain slice on the stride grid still contributes its brain slices.
            keep = keep & has_brain if (keep & has_brain).any() else has_brain
        if keep.all() or not keep.any():
            return batch
        return take_rows(batch, keep)

    def add_volume_scores(self, batch: Any) -> Any:  # noqa: ANN401
        """Restrict each volume's stacked slice maps to the brain (slice scores over brain voxels) and
        set ``volume_score`` on every row."""
        if not isinstance(batch, VolumeBatch) or batch.anomaly_map is None:
            return batch
        maps = _as_slice_maps(batch.anomaly_map).clone()
        if batch.brain_mask is not None and maps.shape[-2:] != batch.brain_mask.shape[-2:]:
            # A resizing pre-processor gives maps at its own size: back to the volume's slice grid,
            # so the map lines up with the scan's geometry.
            maps = F.interpolate(maps[:, None], size=batch.brain_mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        slice_scores = torch.empty(batch.batch_size, dtype=maps.dtype, device=maps.device)
        scores = torch.empty(batch.batch_size, dtype=maps.dtype, device=maps.device)
        for _, rows in batch.volumes():
            brain = batch.brain_mask[rows] if batch.brain_mask is not None else None
            maps[rows], slice_scores[rows] = restrict_to_brain(maps[rows], brain)
            scores[rows] = volume_score(maps[rows], brain, mode=self.volume_score_mode, topk_fraction=self.topk_fraction)
        batch.anomaly_map = maps
        batch.pred_score = slice_scores
        batch.volume_score = scores
        return batch

    def training_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's training step on the selected slices only."""
        return super().training_step(self.training_slices(batch), *args, **kwargs)

    def validation_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.add_volume_scores(super().validation_step(batch, *args, **kwargs))

    def test_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.add_volume_scores(super().test_step(batch, *args, **kwargs))

    def predict_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.add_volume_scores(super().predict_step(batch, *args, **kwargs))


_FACTORY_CACHE: dict[type, type] = {}


def slicewise(model_class: type[AnomalibModule]) -> type[AnomalibModule]:
    """Make the volume-aware subclass of an anomalib image model, e.g. ``slicewise(Padim)``.

    The class is named ``<Model>Slices`` and lives in this module (``Stfpm`` → ``StfpmSlices``), so it
    pickles and resolves by dotted path (``simpleslicenet.models.slicewise.StfpmSlices``) like a class
    written by hand. Calling it twice gives the same class.

    Args:
        model_class: An :class:`~anomalib.models.components.AnomalibModule` subclass for images.
    """
    if isinstance(model_class, type) and issubclass(model_class, SliceWiseMixin):
        return model_class
    if not (isinstance(model_class, type) and issubclass(model_class, AnomalibModule)):
        msg = f"slicewise() expects an anomalib model class, got {model_class!r}"
        raise TypeError(msg)
    if model_class in _FACTORY_CACHE:
        return _FACTORY_CACHE[model_class]
    name = f"{model_class.__name__}Slices"
    existing = globals().get(name)
    if isinstance(existing, type) and model_class in existing.__mro__:
        _FACTORY_CACHE[model_class] = existing
        return existing
    doc = (
        f"anomalib's :class:`{model_class.__module__}.{model_class.__name__}` on the axial slices of volumes, "
        "with 3D maps and volume scores (see :class:`SliceWiseMixin` for the extra arguments)."
    )
    cls = type(name, (SliceWiseMixin, model_class), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    _FACTORY_CACHE[model_class] = cls
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """Resolve ``<Model>Slices`` for any anomalib image model on first use (dotted paths, unpickling)."""
    if name.endswith("Slices") and name != "Slices":
        import anomalib.models  # noqa: PLC0415

        base = getattr(anomalib.models, name[: -len("Slices")], None)
        if isinstance(base, type) and issubclass(base, AnomalibModule):
            return slicewise(base)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


class PatchcoreSlices(SliceWiseMixin, Patchcore):
    """PatchCore (Roth et al., CVPR 2022) on the axial slices of whole volumes.

    Defaults are sized for volumes: a memory bank of every slice location of every training volume is
    large (96 slices × 24 × 24 locations × 152 features per 192×192×96 volume), so training keeps every
    third brain slice and the coreset keeps 1% of the locations.

    Args:
        backbone: timm backbone name.
        layers: Feature layers (timm module names, stride 8 and 16 by default).
        coreset_sampling_ratio: Share of training locations kept in the memory bank.
        num_neighbors: Neighbours used to re-weight the image score.
        train_slice_stride: Train on every k-th slice of each volume.
        brain_slices_only: Train only on slices that contain brain.
        volume_score_mode: ``"max"`` or ``"topk_mean"``.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        backbone_weights: ``"imagenet"`` (bundled offline weights) or ``"random"``.
        image_size: Resize slices to this size (``None``: keep slice size).
        **kwargs: Further :class:`~anomalib.models.Patchcore` arguments (``precision``, ``pre_processor``,
            ``post_processor``, ``evaluator``, ``visualizer``).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        coreset_sampling_ratio: float = 0.01,
        num_neighbors: int = 9,
        train_slice_stride: int = 3,
        brain_slices_only: bool = True,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        backbone_weights: str = "imagenet",
        image_size: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            coreset_sampling_ratio=coreset_sampling_ratio,
            num_neighbors=num_neighbors,
            train_slice_stride=train_slice_stride,
            brain_slices_only=brain_slices_only,
            volume_score_mode=volume_score_mode,
            topk_fraction=topk_fraction,
            backbone_weights=backbone_weights,
            image_size=image_size,
            **kwargs,
        )


class LikelihoodMapGenerator(CflowAnomalyMapGenerator):
    """CFLOW anomaly map that does not depend on the rest of the batch: ``-sum_layers log p`` per dimension.

    anomalib's CFLOW map is ``max(S) - S`` with ``S = sum_layers exp(log p - max log p)``, the maxima
    taken over the whole batch. With a volume as the batch, every volume gets its own scale and its
    maximum is close to the same value whatever it holds, so volume scores cannot be compared. The
    negative log-likelihood per feature dimension, upsampled and summed over layers, is an absolute
    scale: higher means less likely under the healthy model, the same in any batch.
    """

    def compute_anomaly_map(
        self,
        distribution: list[torch.Tensor],
        height: list[int],
        width: list[int],
        image_size: tuple[int, int] | torch.Size | None,
    ) -> torch.Tensor:
        """Sum over layers of the (upsampled) negative log-likelihood per dimension, ``[N, H, W]``.

        Args:
            distribution: Per layer, the log-likelihood per dimension of every location ``[N * h * w]``.
            height: Feature map height per layer.
            width: Feature map width per layer.
            image_size: Output size (``None``: the first layer's size).
        """
        size = tuple(image_size) if image_size is not None else (height[0], width[0])
        score_map = None
        for layer_idx in range(len(self.pool_layers)):
            layer_map = -distribution[layer_idx].detach().reshape(-1, 1, height[layer_idx], width[layer_idx])
            layer_map = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=True)[:, 0]
            score_map = layer_map if score_map is None else score_map + layer_map
        return score_map


class CflowSlices(SliceWiseMixin, Cflow):
    """CFLOW-AD (Gudovskiy et al., WACV 2022) on the axial slices of whole volumes.

    Args:
        backbone: timm backbone name.
        layers: Feature layers, one conditional flow each.
        fiber_batch_size: Feature vectors per flow optimisation step. A volume holds tens of thousands
            of locations, so the default is larger than anomalib's 64.
        condition_vector: Size of the positional condition.
        coupling_blocks: Coupling blocks per flow.
        clamp_alpha: Clamp of the affine coupling.
        permute_soft: Random (soft) permutation between blocks.
        lr: Adam learning rate.
        likelihood_map: Score locations by their negative log-likelihood (:class:`LikelihoodMapGenerator`),
            comparable across volumes; ``False`` keeps anomalib's map, which is scaled by the maximum of
            each batch (here: each volume).
        train_slice_stride: Train on every k-th slice of each volume.
        brain_slices_only: Train only on slices that contain brain.
        volume_score_mode: ``"max"`` or ``"topk_mean"``.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        backbone_weights: ``"imagenet"`` (bundled offline weights) or ``"random"``.
        image_size: Resize slices to this size (``None``: keep slice size).
        **kwargs: Further :class:`~anomalib.models.Cflow` arguments.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        fiber_batch_size: int = 256,
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        permute_soft: bool = False,
        lr: float = 0.0001,
        likelihood_map: bool = True,
        train_slice_stride: int = 1,
        brain_slices_only: bool = True,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        backbone_weights: str = "imagenet",
        image_size: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            fiber_batch_size=fiber_batch_size,
            condition_vector=condition_vector,
            coupling_blocks=coupling_blocks,
            clamp_alpha=clamp_alpha,
            permute_soft=permute_soft,
            lr=lr,
            train_slice_stride=train_slice_stride,
            brain_slices_only=brain_slices_only,
            volume_score_mode=volume_score_mode,
            topk_fraction=topk_fraction,
            backbone_weights=backbone_weights,
            image_size=image_size,
            **kwargs,
        )
        self.likelihood_map = bool(likelihood_map)
        if self.likelihood_map:
            self.model.anomaly_map_generator = LikelihoodMapGenerator(pool_layers=self.model.pool_layers)


class PadimSlices(SliceWiseMixin, Padim):
    """PaDiM (Defard et al., ICPR 2020) on the axial slices of whole volumes.

    PaDiM fits one Gaussian per location, which assumes slices are spatially aligned: true for
    volumes registered to a template.

    Args:
        backbone: timm backbone name.
        layers: Feature layers.
        n_features: Size of the random feature subset (anomalib keeps 100 of ResNet-18's 448; here 100 of 152).
        train_slice_stride: Train on every k-th slice of each volume.
        brain_slices_only: Train only on slices that contain brain.
        volume_score_mode: ``"max"`` or ``"topk_mean"``.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        backbone_weights: ``"imagenet"`` (bundled offline weights) or ``"random"``.
        image_size: Resize slices to this size (``None``: keep slice size).
        **kwargs: Further :class:`~anomalib.models.Padim` arguments.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        n_features: int | None = 100,
        train_slice_stride: int = 1,
        brain_slices_only: bool = True,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        backbone_weights: str = "imagenet",
        image_size: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            n_features=n_features,
            train_slice_stride=train_slice_stride,
            brain_slices_only=brain_slices_only,
            volume_score_mode=volume_score_mode,
            topk_fraction=topk_fraction,
            backbone_weights=backbone_weights,
            image_size=image_size,
            **kwargs,
        )


# FastFlow and Reverse Distillation only build for ResNet-style backbones (no bundled weights) and a
# fixed input size: pass backbone_weights="random" and image_size, as configs/model/ does.
FastflowSlices = slicewise(Fastflow)
ReverseDistillationSlices = slicewise(ReverseDistillation)
