"""The one scoring step every model and the deployed inferencer share: raw voxel map in, scores out.

A model's job ends at its raw voxel map ``[N, H, W]`` (the slices of one or more volumes, in order).
:func:`score_volumes` then, per volume,

* brings the map onto the volume's slice grid (models that resize slices internally return smaller maps),
* optionally smooths it over the brain's voxels only (``VolumeScoring(smoothing_sigma=...)``, a normalised
  convolution): values outside the brain, where a model trained on brain tissue scores its highest, never
  leak into the brain's edge (SimpleSliceNet's default);
* optionally centres it on the volume's median brain voxel (``VolumeScoring(map_reference="brain_median")``):
  a scan's map is then measured against its own typical brain tissue, which takes out a per-scan offset of
  the whole map (SimpleSliceNet's default);
* restricts it to the brain: outside the brain every voxel gets the volume's lowest brain score. Scans
  are skull-stripped, so nothing there can be a lesion; left in, responses to the background and the
  crop border would decide the scores. The floor is the volume's own minimum, not 0, because some
  models' scores are negative (log-likelihood maps);
* takes slice scores (maximum over each slice's brain voxels) and one volume score
  (:class:`VolumeScoring`: the maximum, or the mean of the top fraction of brain voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.choices import check_choice
from simpleslicenet.models.smoothing import masked_gaussian_blur_3d
from simpleslicenet.records import SettingsRecord

__all__ = [
    "MAP_REFERENCES", "SCORE_MODES", "VolumeScoring", "VolumeScores", "score_volumes", "slice_scores", "to_slice_grid", "volume_score",
]

SCORE_MODES = ("max", "topk_mean")
# "none": the model's map as it is; "brain_median": minus the volume's median brain-voxel score.
MAP_REFERENCES = ("none", "brain_median")


@dataclass(frozen=True)
class VolumeScoring(SettingsRecord):
    """How one volume's voxel map becomes its volume score.

    Args:
        volume_score_mode: ``"max"`` or ``"topk_mean"`` (mean of the highest ``topk_fraction`` of the
            brain voxels; less sensitive to a single hot voxel than the maximum).
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        map_reference: ``"none"`` or ``"brain_median"``: subtract the volume's median brain-voxel
            score from its map (after the smoothing, before anything else; see :data:`MAP_REFERENCES`).
        smoothing_sigma: Gaussian smoothing of the map over the brain's voxels, in voxels (4σ radius,
            mirrored ends); ``0``: none (the model's map is taken as it is).

    Raises:
        ValueError: An unknown mode or reference, a fraction outside (0, 1], or a negative smoothing.
    """

    volume_score_mode: str = "max"
    topk_fraction: float = 0.001
    map_reference: str = "none"
    smoothing_sigma: float = 0.0

    def __post_init__(self) -> None:
        check_choice("volume_score_mode", self.volume_score_mode, SCORE_MODES)
        check_choice("map_reference", self.map_reference, MAP_REFERENCES)
        fraction = float(self.topk_fraction)
        if not 0.0 < fraction <= 1.0:
            msg = f"topk_fraction must lie in (0, 1], got {self.topk_fraction!r}"
            raise ValueError(msg)
        object.__setattr__(self, "topk_fraction", fraction)
        sigma = float(self.smoothing_sigma)
        if not 0.0 <= sigma < float("inf"):
            msg = f"smoothing_sigma must be a finite number of voxels >= 0, got {self.smoothing_sigma!r}"
            raise ValueError(msg)
        object.__setattr__(self, "smoothing_sigma", sigma)


@dataclass
class VolumeScores:
    """Scores of the volumes in one batch (rows are slices).

    Args:
        anomaly_map: ``[N, H, W]`` brain-restricted voxel map on the slice grid.
        slice_scores: ``[N]`` maximum of each slice's brain voxels.
        volume_scores: ``[N]`` each row's volume score (one value repeated over a volume's rows).
    """

    anomaly_map: torch.Tensor
    slice_scores: torch.Tensor
    volume_scores: torch.Tensor


def to_slice_grid(
    anomaly_map: torch.Tensor,
    size: tuple[int, int] | torch.Size,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Maps ``[N, H', W']`` or ``[N, 1, H', W']`` as ``[N, H, W]`` on the slice grid ``size``."""
    maps = anomaly_map[:, 0] if anomaly_map.dim() == 4 else anomaly_map
    if tuple(maps.shape[-2:]) != tuple(size):
        corners = {"align_corners": False} if mode == "bilinear" else {}
        maps = F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, **corners)[:, 0]
    return maps


def slice_scores(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Score of each slice ``[N]``: the maximum of its map ``[N, H, W]``."""
    return anomaly_map.flatten(1).amax(dim=1)


def volume_score(values: torch.Tensor, scoring: VolumeScoring, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Score of one volume from its brain voxels' scores (any shape).

    Args:
        values: The brain voxels' scores, or all voxels' scores with ``mask``.
        scoring: How the score is taken.
        mask: Which of ``values`` are brain voxels (not empty). With a mask no shape depends on the
            data, so the device is never waited for (GPU streams, CUDA graphs); same result.
    """
    values = values.flatten()
    if mask is None:
        if scoring.volume_score_mode == "max":
            return values.max()
        k = max(1, int(round(values.numel() * scoring.topk_fraction)))
        return values.topk(k).values.mean()
    masked = torch.where(mask.flatten(), values, float("-inf"))
    if scoring.volume_score_mode == "max":
        return masked.amax()
    # k of the masked voxels, rounded as above (half to even, in float64), at most k of all voxels.
    k_max = max(1, int(round(values.numel() * scoring.topk_fraction)))
    k = torch.round(mask.sum().double() * scoring.topk_fraction).clamp(min=1)
    if masked.numel() >= 4 * k_max:
        # The k largest lie among four blocks' k largest: the same values, and on a CPU the selection in
        # rows is several times faster than one over the whole volume (34 against 9 ms at 96x192x192).
        head = masked[: masked.numel() // 4 * 4].view(4, -1)
        masked = torch.cat([head.topk(k_max, dim=1).values.flatten(), masked[head.numel() :]])
    top = masked.topk(k_max).values
    taken = torch.arange(k_max, device=values.device) < k
    return torch.where(taken, top, 0.0).sum() / k.to(values.dtype)


def score_volumes(
    anomaly_map: torch.Tensor,
    brain_mask: torch.Tensor | None,
    volume_rows: list[slice] | None = None,
    scoring: VolumeScoring | None = None,
) -> VolumeScores:
    """Brain-restricted map, slice scores and volume scores of every volume in a batch.

    Args:
        anomaly_map: Raw voxel map ``[N, H, W]`` or ``[N, 1, h, w]`` (resized to the brain mask's grid).
        brain_mask: ``[N, H, W]`` boolean brain mask, or ``None`` (every voxel counts).
        volume_rows: Rows of each volume; ``None``: all rows are one volume.
        scoring: How the volume score is taken (default :class:`VolumeScoring()`).

    Nothing here branches on the data or makes a shape from it, so on a GPU the host never waits for
    the device (a loop over the batch's volumes only queues work).
    """
    scoring = scoring if scoring is not None else VolumeScoring()
    size = brain_mask.shape[-2:] if brain_mask is not None else anomaly_map.shape[-2:]
    maps = to_slice_grid(anomaly_map, size).clone()
    rows_of_volumes = volume_rows if volume_rows is not None else [slice(0, maps.shape[0])]
    volume_scores = torch.empty(maps.shape[0], dtype=maps.dtype, device=maps.device)
    for rows in rows_of_volumes:
        volume = maps[rows]
        # Without a brain mask every voxel counts. A volume without brain voxels keeps every voxel too
        # (tensor algebra, not an if on the device's data).
        brain = brain_mask[rows].bool() if brain_mask is not None else torch.ones_like(volume, dtype=torch.bool)
        counted = brain | ~brain.any()
        if scoring.smoothing_sigma > 0:
            volume = masked_gaussian_blur_3d(volume, counted, scoring.smoothing_sigma)
        if scoring.map_reference == "brain_median":
            # NaN outside the brain rather than indexing it out: no shape made from the data.
            volume = volume - torch.where(counted, volume, float("nan")).nanmedian()
        floor = torch.where(brain, volume, float("inf")).amin()
        maps[rows] = torch.where(counted, volume, floor)
        volume_scores[rows] = volume_score(volume, scoring, mask=counted)
    return VolumeScores(anomaly_map=maps, slice_scores=slice_scores(maps), volume_scores=volume_scores)
