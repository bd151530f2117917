"""CFLOW-AD on slices, scored by a likelihood map that is comparable across volumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models import Cflow
from anomalib.models.image.cflow.anomaly_map import AnomalyMapGenerator as CflowAnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.models.backbones import DEFAULT_BACKBONE, DEFAULT_LAYER_NAMES
from simpleslicenet.models.slicewise.mixin import SliceWiseMixin

__all__ = ["CflowSlices", "LikelihoodMapGenerator"]


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
        likelihood_map: Score locations by their negative log-likelihood (:class:`LikelihoodMapGenerator`),
            comparable across volumes; ``False`` keeps anomalib's map, which is scaled by the maximum of
            each batch (here: each volume).
        **kwargs: :class:`~simpleslicenet.models.slicewise.mixin.SliceWiseMixin` arguments
            (``train_slice_stride``, ``brain_slices_only``, ``volume_score_mode``, ``topk_fraction``, ``backbone_weights``,
            ``image_size``) and further :class:`~anomalib.models.Cflow` arguments, with Cflow's defaults
            (``condition_vector``, ``coupling_blocks``, ``clamp_alpha``, ``permute_soft``, ``lr``).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYER_NAMES,
        fiber_batch_size: int = 256,
        likelihood_map: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, layers=layers, fiber_batch_size=fiber_batch_size, **kwargs)
        self.likelihood_map = bool(likelihood_map)
        if self.likelihood_map:
            self.model.anomaly_map_generator = LikelihoodMapGenerator(pool_layers=self.model.pool_layers)
