"""Operations on whole-volume score maps shared by every model: 3D smoothing and score aggregation."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F  # noqa: N812

__all__ = ["gaussian_kernel_1d", "gaussian_blur_3d", "restrict_to_brain", "slice_scores", "volume_score"]


def gaussian_kernel_1d(sigma: float, truncate: float = 3.0, device=None, dtype=torch.float32) -> torch.Tensor:  # noqa: ANN001
    """Normalised 1-D Gaussian of radius ``ceil(truncate * sigma)``."""
    radius = max(1, math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur_3d(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3-D Gaussian smoothing on the tensor's own device (no CPU round trip).

    Args:
        volume: ``[D, H, W]`` or ``[N, 1, D, H, W]``.
        sigma: Standard deviation in voxels; ``0`` returns the input.

    Borders are handled by replicate padding so a border voxel is not pulled towards zero.
    """
    if sigma <= 0:
        return volume
    squeeze = volume.dim() == 3
    x = volume[None, None] if squeeze else volume
    kernel = gaussian_kernel_1d(sigma, device=x.device, dtype=x.dtype)
    radius = kernel.numel() // 2
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        # F.pad lists the last dimension first.
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x[0, 0] if squeeze else x


def slice_scores(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Score of each slice ``[D]``: the maximum of its map ``[D, H, W]``."""
    return anomaly_map.flatten(1).amax(dim=1)


def restrict_to_brain(anomaly_map: torch.Tensor, brain_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume's map ``[D, H, W]`` with voxels outside the brain set to its lowest brain score, and
    slice scores ``[D]`` taken over brain voxels only.

    Scans are skull-stripped, so nothing outside the brain can be a lesion; left in, responses to the
    background and to the crop border would decide the slice scores. The floor is the volume's own
    minimum (not 0) because some models' scores are negative (log-likelihood maps).
    """
    if brain_mask is None or not brain_mask.any():
        return anomaly_map, slice_scores(anomaly_map)
    brain = brain_mask.bool()
    floor = anomaly_map[brain].min()
    restricted = torch.where(brain, anomaly_map, floor)
    return restricted, slice_scores(restricted)


def volume_score(
    anomaly_map: torch.Tensor,
    brain_mask: torch.Tensor | None = None,
    mode: str = "max",
    topk_fraction: float = 0.001,
) -> torch.Tensor:
    """Anomaly score of one volume from its voxel map ``[D, H, W]``.

    Args:
        anomaly_map: Voxel scores.
        brain_mask: Restrict to these voxels when given.
        mode: ``"max"`` or ``"topk_mean"`` (mean of the highest ``topk_fraction`` of voxels; less
            sensitive to a single hot voxel than the maximum).
        topk_fraction: Share of voxels averaged in ``topk_mean`` mode.
    """
    values = anomaly_map[brain_mask.bool()] if brain_mask is not None and brain_mask.any() else anomaly_map.flatten()
    if mode == "max":
        return values.max()
    if mode == "topk_mean":
        k = max(1, int(round(values.numel() * topk_fraction)))
        return values.topk(k).values.mean()
    msg = f"unknown volume score mode {mode!r}: use 'max' or 'topk_mean'"
    raise ValueError(msg)
