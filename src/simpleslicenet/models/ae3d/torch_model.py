"""PyTorch model of the 3D convolutional autoencoder baseline.

The network reconstructs a whole volume ``[N, 1, D, H, W]``; the anomaly map is the absolute
residual, smoothed in 3D and restricted to the brain. :meth:`AutoEncoder3dModel.forward` takes what
every model of the package takes, one volume's slice stack ``[D, C, H, W]``, so the exported graph
has the same input as the slice-wise models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.models.scoring import slice_scores
from simpleslicenet.models.smoothing import gaussian_blur_3d

__all__ = ["AutoEncoder3dModel", "residual_map", "masked_reconstruction_loss"]

NORMS = ("batch", "instance", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def _down_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Halve every spatial size: 4³ kernel, stride 2 (no checkerboard overlap gaps), norm, LeakyReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=norm == "none"),
        _norm(norm, out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Double every spatial size with a transposed convolution, the mirror of :func:`_down_block`."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=norm == "none"),
        _norm(norm, out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def masked_reconstruction_loss(
    volume: torch.Tensor,
    reconstruction: torch.Tensor,
    brain_mask: torch.Tensor | None = None,
    loss: str = "l1",
) -> torch.Tensor:
    """Mean L1 or squared error over brain voxels (all voxels when no mask is given).

    Args:
        volume: Input ``[N, 1, D, H, W]``.
        reconstruction: Output of the autoencoder, same shape.
        brain_mask: Boolean ``[N, 1, D, H, W]`` (or broadcastable).
        loss: ``"l1"`` or ``"mse"``.
    """
    error = (reconstruction - volume).abs() if loss == "l1" else (reconstruction - volume).pow(2)
    if brain_mask is None:
        return error.mean()
    weight = brain_mask.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def residual_map(volume: torch.Tensor, reconstruction: torch.Tensor, sigma: float) -> torch.Tensor:
    """Raw anomaly map ``[N, 1, D, H, W]``: ``|x - x̂|`` smoothed by a 3D Gaussian."""
    return gaussian_blur_3d((volume - reconstruction).abs(), sigma)


class AutoEncoder3dModel(nn.Module):
    """3D convolutional autoencoder with a spatial bottleneck.

    ``depth`` stride-2 blocks (widths ``widths``) encode the volume to ``1 / 2**depth`` of its size,
    a 1×1×1 convolution squeezes it to ``latent_channels``, and a mirrored decoder of transposed
    convolutions brings it back, ending in a sigmoid because inputs are scaled to ``[0, 1]``.
    Volumes are zero-padded to a multiple of ``2**depth`` and cropped back.

    Args:
        widths: Channels of the encoder blocks, shallow to deep; the decoder mirrors them.
        latent_channels: Channels of the bottleneck.
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        sigma: Standard deviation (voxels) of the Gaussian that smooths the residual; ``0`` for none.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        latent_channels: int = 16,
        norm: str = "instance",
        sigma: float = 2.0,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            msg = f"widths must be a non-empty list of positive channel counts, got {widths}"
            raise ValueError(msg)
        if norm not in NORMS:
            msg = f"norm must be one of {NORMS}, got {norm!r}"
            raise ValueError(msg)
        self.widths = widths
        self.depth = len(widths)
        self.sigma = float(sigma)
        channels = [1, *widths]
        self.encoder = nn.Sequential(*(_down_block(channels[i], channels[i + 1], norm) for i in range(self.depth)))
        self.bottleneck = nn.Sequential(
            nn.Conv3d(widths[-1], latent_channels, kernel_size=1),
            _norm(norm, latent_channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(latent_channels, widths[-1], kernel_size=1),
            _norm(norm, widths[-1]),
            nn.LeakyReLU(0.2, inplace=True),
        )
        # Mirror: 128→64→32→16→16, then a 3×3×3 convolution to one channel.
        up = [*widths[::-1], widths[0]]
        self.decoder = nn.Sequential(*(_up_block(up[i], up[i + 1], norm) for i in range(self.depth)))
        self.head = nn.Conv3d(widths[0], 1, kernel_size=3, padding=1)

    def reconstruct(self, volume: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``volume`` ``[N, 1, D, H, W]`` (any size: padded and cropped internally)."""
        size = volume.shape[-3:]
        multiple = 2**self.depth
        pad = [(-s) % multiple for s in size]
        # F.pad lists the last dimension first.
        padded = F.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else volume
        latent = self.bottleneck(self.encoder(padded))
        output = torch.sigmoid(self.head(self.decoder(latent)))
        return output[..., : size[0], : size[1], : size[2]]

    @staticmethod
    def fold(slices: torch.Tensor) -> torch.Tensor:
        """One volume's slice stack ``[D, C, H, W]`` → ``[1, 1, D, H, W]``: its one grey channel.

        The datamodules hold a scan's grey values once and show them as three equal channels
        (:func:`~simpleslicenet.data.slices.slice_stack`); this reads that channel, without a copy.
        """
        return slices[:, 0][None, None]

    def forward(self, slices: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Reconstruct one volume given as its slice stack.

        Args:
            slices: ``[D, C, H, W]`` slices of one volume in ``[0, 1]``.

        Returns:
            In training mode the reconstruction ``[1, 1, D, H, W]``; otherwise an
            :class:`~anomalib.data.InferenceBatch` with ``anomaly_map [D, H, W]`` and
            ``pred_score [D]`` (slice maxima).
        """
        volume = self.fold(slices)
        reconstruction = self.reconstruct(volume)
        if self.training:
            return reconstruction
        anomaly_map = residual_map(volume, reconstruction, self.sigma)[0, 0]
        return InferenceBatch(pred_score=slice_scores(anomaly_map), anomaly_map=anomaly_map)
