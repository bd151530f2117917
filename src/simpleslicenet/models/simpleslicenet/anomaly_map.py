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

from simpleslicenet.models.smoothing import resize_and_blur

from .precision import full_precision

__all__ = ["AnomalyMapGenerator", "likelihood_to_score"]


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

    The log-likelihood ``ℓ`` is resized and smoothed first (scipy's ``gaussian_filter`` conventions: a
    4σ radius, mirrored borders, as in the authors' code), then made a score.

    Args:
        sigma: Standard deviation of the Gaussian smoothing in voxels (paper: 4); ``0`` turns it off.
        peak: The paper's score ``1 − exp(ℓ − max ℓ)``, measured against the volume's (or image's) most
            likely location; ``False``: ``−ℓ``, which the shared scoring step measures against the scan's
            median brain voxel (it needs the brain mask the graph does not take).
    """

    def __init__(self, sigma: float = 4.0, peak: bool = True) -> None:
        super().__init__()
        self.sigma = sigma
        self.peak = peak

    def _map(self, log_likelihood: torch.Tensor, size: tuple[int, ...], dims: tuple[int, ...] | None) -> torch.Tensor:
        with full_precision(log_likelihood.device.type):
            smoothed = resize_and_blur(log_likelihood.float(), size, self.sigma, truncate=4.0, mode="reflect")
            return likelihood_to_score(smoothed, dims) if self.peak else -smoothed

    def volume_map(self, log_likelihood: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel map ``[D, H, W]`` of ONE volume from its cell grid ``[d, h, w]``.

        Upsampling is trilinear and the smoothing 3-D; with ``peak`` the score is measured against the
        volume's own most likely cell.
        """
        return self._map(log_likelihood, size, None)

    def image_maps(self, log_likelihood: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pixel maps ``[N, H, W]`` of independent images from their grids ``[N, h, w]``.

        Smoothed in 2-D; with ``peak`` each image is measured against its own most likely location.
        """
        return self._map(log_likelihood, size, (1, 2))

    def forward(self, log_likelihood: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Alias of :meth:`volume_map`."""
        return self.volume_map(log_likelihood, size)
