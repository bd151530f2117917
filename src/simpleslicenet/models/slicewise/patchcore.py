"""PatchCore on slices, with the heap fix its coreset search needs on the CPU.

PatchCore's k-center-greedy loop grows the glibc heap by ~12 MB a step on CPU until the process is
killed, because each step frees and re-allocates a large distance buffer just below glibc's dynamic
mmap threshold. Building a :class:`PatchcoreSlices` lowers that threshold to 8 MiB
(``mallopt(M_MMAP_THRESHOLD)``), so large buffers go back to the system when freed. It is done where
PatchCore runs, not at import, and is a no-op on platforms without glibc (:mod:`simpleslicenet.heap`).
"""

from __future__ import annotations

from collections.abc import Sequence

from anomalib.models import Patchcore

from simpleslicenet.heap import limit_heap_growth
from simpleslicenet.models.backbones import DEFAULT_BACKBONE, DEFAULT_LAYER_NAMES
from simpleslicenet.models.slicewise.mixin import SliceWiseMixin

__all__ = ["PatchcoreSlices"]


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
        **kwargs: :class:`~simpleslicenet.models.slicewise.mixin.SliceWiseMixin` arguments
            (``brain_slices_only``, ``volume_score_mode``, ``topk_fraction``, ``backbone_weights``,
            ``image_size``) and further :class:`~anomalib.models.Patchcore` arguments.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYER_NAMES,
        coreset_sampling_ratio: float = 0.01,
        num_neighbors: int = 9,
        train_slice_stride: int = 3,
        **kwargs,
    ) -> None:
        limit_heap_growth()
        super().__init__(
            backbone=backbone,
            layers=layers,
            coreset_sampling_ratio=coreset_sampling_ratio,
            num_neighbors=num_neighbors,
            train_slice_stride=train_slice_stride,
            **kwargs,
        )
