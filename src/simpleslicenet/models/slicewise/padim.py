"""PaDiM on slices."""

from __future__ import annotations

from collections.abc import Sequence

from anomalib.models import Padim

from simpleslicenet.models.backbones import DEFAULT_BACKBONE, DEFAULT_LAYER_NAMES
from simpleslicenet.models.slicewise.mixin import SliceWiseMixin

__all__ = ["PadimSlices"]


class PadimSlices(SliceWiseMixin, Padim):
    """PaDiM (Defard et al., ICPR 2020) on the axial slices of whole volumes.

    PaDiM fits one Gaussian per location, which assumes slices are spatially aligned: true for
    volumes registered to a template.

    Args:
        backbone: timm backbone name.
        layers: Feature layers.
        n_features: Size of the random feature subset (anomalib keeps 100 of ResNet-18's 448; here 100 of 152).
        **kwargs: :class:`~simpleslicenet.models.slicewise.mixin.SliceWiseMixin` arguments
            (``train_slice_stride``, ``brain_slices_only``, ``volume_score_mode``, ``topk_fraction``, ``backbone_weights``,
            ``image_size``) and further :class:`~anomalib.models.Padim` arguments.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYER_NAMES,
        n_features: int | None = 100,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, layers=layers, n_features=n_features, **kwargs)
