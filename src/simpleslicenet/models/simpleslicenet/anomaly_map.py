"""From per-location log-likelihoods to a smoothed voxel anomaly map, on the tensor's own device.

Upsampling (trilinear / bilinear, ``align_corners=False``) and Gaussian smoothing are both separable
linear maps, so they run as one small matrix per axis applied to the cell grid
(:func:`~simpleslicenet.models.smoothing.resize_and_blur`): no full-resolution intermediate, no
data-dependent shape, no host round trip. The map is always computed in float32, also inside an
outer bf16 autocast region (see :mod:`.precision`).
"""

from __future__ import annotations

import torch
from torch import nn

from simpleslicenet.choices import check_choice
from simpleslicenet.models.smoothing import resize_and_blur

from .precision import full_precision

__all__ = ["MAP_ORDERS", "MAP_REFERENCES", "AnomalyMapGenerator", "likelihood_to_score"]

# "smooth_then_score" (the default): resize and smooth ℓ itself, then the score, with scipy's
# gaussian_filter defaults (4σ, mirrored borders), the order of the authors' code; on the phantom it
# gave a higher voxel AUPRC for every seed (benchmarks/accuracy_levers.py). "score_then_smooth":
# 1 − exp(ℓ − max ℓ) on the cell grid, then resize and smooth (replicate borders, 3σ).
MAP_ORDERS = ("score_then_smooth", "smooth_then_score")
# What the map is measured against inside the model. "peak" (the paper's): 1 − exp(ℓ − max ℓ), the
# volume's own most likely cell. "none": the smoothed negative log-likelihood −ℓ itself, left for the
# scoring step to centre on the scan's median brain voxel (VolumeScoring(map_reference="brain_median")),
# which needs the brain mask the graph does not take. A single extreme cell sets the peak; the median
# of a scan's brain is a steadier measure of its level (README "Detection"). With SimpleSliceNet's default
# smoothing_region="brain" this generator only upsamples (sigma 0) and the scoring step smooths within
# the brain mask.
MAP_REFERENCES = ("peak", "none")


def likelihood_to_score(log_likelihood: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """``1 − exp(ℓ − max ℓ)``: 0 at the most likely location, towards 1 where the flow finds it unlikely.

    Args:
        log_likelihood: Per-dimension log-likelihoods.
        dims: Dimensions the maximum is taken over (``None``: the whole tensor, i.e. one volume).
    """
    if dims is None:
        peak = log_likelihood.max()
    else:
        peak = log_likelihood.amax(dim=dims, keepdim=True)
    return 1 - torch.exp(log_likelihood - peak)


class AnomalyMapGenerator(nn.Module):
    """Score map at input resolution from a grid of log-likelihoods.

    Args:
        sigma: Standard deviation of the Gaussian smoothing in voxels (paper: 4); ``0`` turns it off.
        order: One of :data:`MAP_ORDERS` (with ``reference="peak"``).
        reference: One of :data:`MAP_REFERENCES`. With ``"none"`` the map is ``−ℓ`` smoothed as in
            ``"smooth_then_score"`` and ``order`` has no effect.
    """

    def __init__(self, sigma: float = 4.0, order: str = "smooth_then_score", reference: str = "peak") -> None:
        super().__init__()
        check_choice("map order", order, MAP_ORDERS)
        check_choice("map reference", reference, MAP_REFERENCES)
        self.sigma = sigma
        self.order = order
        self.reference = reference

    def _map(self, log_likelihood: torch.Tensor, size: tuple[int, ...], dims: tuple[int, ...] | None) -> torch.Tensor:
        with full_precision(log_likelihood.device.type):
            log_likelihood = log_likelihood.float()
            if self.reference == "peak" and self.order == "score_then_smooth":
                return resize_and_blur(likelihood_to_score(log_likelihood, dims), size, self.sigma)
            smoothed = resize_and_blur(log_likelihood, size, self.sigma, truncate=4.0, mode="reflect")
            return likelihood_to_score(smoothed, dims) if self.reference == "peak" else -smoothed

    def volume_map(self, log_likelihood: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel map ``[D, H, W]`` of ONE volume from its cell grid ``[d, h, w]``.

        With ``reference="peak"`` the score is normalised by the volume's own most likely cell;
        upsampling is trilinear and the smoothing 3-D, before or after the score as ``order`` says.
        """
        return self._map(log_likelihood, size, None)

    def image_maps(self, log_likelihood: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pixel maps ``[N, H, W]`` of independent images from their grids ``[N, h, w]``.

        Smoothed in 2-D; with ``reference="peak"`` each image is normalised by its own most likely location.
        """
        return self._map(log_likelihood, size, (1, 2))

    def forward(self, log_likelihood: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Alias of :meth:`volume_map`."""
        return self.volume_map(log_likelihood, size)
