"""Slice features of SimpleSliceNet: local neighbourhood, channel pooling, layer fusion, depth mean.

The original formulation unfolds every 3×3 patch into a ``9·C`` vector and shrinks it with a 1-D
adaptive average pool. Both steps are linear averages, so the same numbers come from a 3×3 average
pool (zero padded, dividing by 9 at the border like the zero-padded unfold) followed by averaging
adjacent channel groups, without ever materialising the nine-fold tensor. The two agree exactly when
the embedding size divides the channel count (as in the paper: 512 | 512 and 512 | 1024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.models.smoothing import apply_separable

from .precision import check_precision, encoder_autocast

__all__ = [
    "CPU_CHUNK_PIXELS",
    "FeatureStandardizer",
    "SliceFeatureExtractor",
    "aggregate_depth",
    "brain_cell_share",
    "channel_pool",
    "depth_average_matrix",
    "depth_cell_centres",
    "pool_neighbourhood",
    "positional_encoding_1d",
    "positional_encoding_2d",
]


def pool_neighbourhood(features: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Mean of each location's ``size × size`` neighbourhood, zeros beyond the border.

    Args:
        features: ``[N, C, h, w]``.
        size: Odd neighbourhood size.
    """
    if size <= 1:
        return features
    if size % 2 == 0:
        msg = f"neighbourhood size must be odd, got {size}"
        raise ValueError(msg)
    # count_include_pad=True divides by size² at the border too, like averaging a zero-padded unfold.
    return F.avg_pool2d(features, kernel_size=size, stride=1, padding=size // 2, count_include_pad=True)


def _adaptive_average_matrix(in_channels: int, out_channels: int) -> torch.Tensor:
    """``[out, in]`` matrix of ``adaptive_avg_pool1d``.

    Row ``i`` averages inputs ``floor(i·in/out)`` to ``ceil((i+1)·in/out)`` (exclusive).
    """
    matrix = torch.zeros(out_channels, in_channels)
    for i in range(out_channels):
        start = (i * in_channels) // out_channels
        stop = math.ceil((i + 1) * in_channels / out_channels)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def channel_pool(features: torch.Tensor, out_channels: int, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Average adjacent channel groups of ``[N, C, h, w]`` down (or up) to ``out_channels``.

    Same numbers as ``adaptive_avg_pool1d`` over the channel axis. When ``out_channels`` divides ``C``
    the groups are disjoint and this is a reshape and mean; otherwise a fixed averaging matrix is applied.

    Args:
        features: ``[N, C, h, w]``.
        out_channels: Channels after pooling.
        matrix: Precomputed ``[out_channels, C]`` averaging matrix for the non-dividing case.
    """
    channels = features.shape[1]
    if channels == out_channels:
        return features
    if channels % out_channels == 0:
        return features.unflatten(1, (out_channels, channels // out_channels)).mean(dim=2)
    if matrix is None:
        matrix = _adaptive_average_matrix(channels, out_channels).to(features)
    return F.conv2d(features, matrix[:, :, None, None])


# On the CPU, a whole 1-mm volume through the backbone makes activations of hundreds of MB. Blocks
# that large are above glibc's mmap threshold: each is mapped fresh and unmapped when freed, so the
# kernel zero-fills every page again at every layer (2.3 million page faults and twice as much system
# as user time a volume). Chunks of a few MB come from the heap, which keeps them for the next chunk
# (with the heap settings of simpleslicenet.heap).
CPU_CHUNK_PIXELS = 4 * 224 * 224


def _traced(images: torch.Tensor) -> bool:
    """Whether the call is being compiled, exported or traced (where a chunk loop would fix ``N``)."""
    symbolic = not isinstance(images.shape[0], int)  # export and dynamic compilation trace symbolic sizes
    return symbolic or torch.compiler.is_compiling() or torch.jit.is_tracing()


class SliceFeatureExtractor(nn.Module):
    """Frozen backbone → per-layer neighbourhood + channel pooling → upsample → fused embedding.

    Args:
        backbone: Feature extractor returning a list of ``[N, C_l, h_l, w_l]`` maps (first = finest).
        layer_channels: ``C_l`` of each returned map.
        embed_dim: Channels of each layer after pooling and of the fused embedding; ``None`` keeps
            every layer's own channels and concatenates them (``sum C_l``).
        neighbourhood: Size of the local averaging window.
        precision: ``"fp32"``, or ``"bf16"`` to run the backbone and pooling under bf16 autocast (the
            embedding is returned in float32 either way; see :mod:`.precision`).
        padding: Pixels of background added around each slice before the backbone (each channel's
            darkest value, the background of a skull-stripped slice); the embedding is cut back to the
            slice's locations. The backbone pads with zeros, which after ImageNet normalisation is
            mid-grey, not black: without this margin that false edge lies against a brain that nearly
            fills the slice.
        stride: Pixels per embedding location (the finest stage's reduction); ``padding`` must be a
            multiple of it, so the cut keeps the locations aligned with the slice.

    Raises:
        ValueError: An unknown precision, or a padding that is negative or not a multiple of ``stride``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer_channels: Sequence[int],
        embed_dim: int | None = None,
        neighbourhood: int = 3,
        precision: str = "fp32",
        padding: int = 0,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.precision = check_precision(precision)
        if padding < 0 or padding % stride:
            msg = f"slice padding must be a multiple of the feature stride {stride} pixels, got {padding}"
            raise ValueError(msg)
        self.padding = int(padding)
        self.stride = int(stride)
        self.backbone = backbone
        self.layer_channels = [int(c) for c in layer_channels]
        self.embed_dim = embed_dim
        self.neighbourhood = neighbourhood
        layer_dims = self.layer_channels if embed_dim is None else [embed_dim] * len(self.layer_channels)
        self.layer_dims = layer_dims
        self.out_dim = sum(layer_dims) if embed_dim is None else embed_dim
        # Averaging matrices for channel counts the embedding size does not divide (buffers so they
        # follow the module's device; not persistent, they are recomputed from the arguments).
        for index, (channels, dim) in enumerate(zip(self.layer_channels, layer_dims, strict=True)):
            if channels % dim:
                self.register_buffer(
                    f"_layer_matrix_{index}", _adaptive_average_matrix(channels, dim), persistent=False
                )
        if sum(layer_dims) % self.out_dim:
            self.register_buffer(
                "_fuse_matrix", _adaptive_average_matrix(sum(layer_dims), self.out_dim), persistent=False
            )

    def train(self, mode: bool = True) -> SliceFeatureExtractor:
        """The backbone is frozen: it stays in eval mode so batch-norm statistics never drift."""
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse backbone maps ``[N, C_l, h_l, w_l]`` into ``[N, out_dim, h_0, w_0]``."""
        pooled = []
        for index, feature_map in enumerate(maps):
            local = pool_neighbourhood(feature_map, self.neighbourhood)
            local = channel_pool(local, self.layer_dims[index], getattr(self, f"_layer_matrix_{index}", None))
            if index > 0:
                local = F.interpolate(local, size=pooled[0].shape[-2:], mode="bilinear", align_corners=False)
            pooled.append(local)
        fused = torch.cat(pooled, dim=1)
        return channel_pool(fused, self.out_dim, getattr(self, "_fuse_matrix", None))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 embedding ``[N, out_dim, h, w]`` of ImageNet-normalised images ``[N, 3, H, W]``.

        Eager CPU calls run in chunks of about :data:`CPU_CHUNK_PIXELS` padded pixels (the same numbers up
        to float32 rounding where a chunk has another batch size); a GPU, ``torch.compile`` and export see
        one call over all ``N`` images.
        """
        pixels = (images.shape[-2] + 2 * self.padding) * (images.shape[-1] + 2 * self.padding)
        chunk = max(1, CPU_CHUNK_PIXELS // pixels)
        if images.device.type == "cpu" and not _traced(images) and images.shape[0] > chunk:
            return torch.cat([self.embed_slices(part) for part in images.split(chunk)])
        return self.embed_slices(images)

    def embed_slices(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in one call."""
        if self.padding:
            # The slice lies in a canvas of its darkest value; where its border is background, that is
            # the same as repeating the border. The slice's own values pass unchanged.
            margin = (self.padding,) * 4
            inside = F.pad(torch.ones_like(images[:1, :1]), margin) > 0
            images = torch.where(inside, F.pad(images, margin), images.amin(dim=(-2, -1), keepdim=True))
        with encoder_autocast(images.device.type, self.precision):
            with torch.no_grad():
                maps = self.backbone(images)
            embedding = self.embed(maps)
        if self.padding:
            cut = self.padding // self.stride
            embedding = embedding[..., cut : embedding.shape[-2] - cut, cut : embedding.shape[-1] - cut]
        return embedding.float()


def depth_cell_centres(depth: int, window: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Slice index at the centre of each depth cell of :func:`aggregate_depth` (``ceil(depth/stride)`` cells)."""
    cells = (depth + stride - 1) // stride
    return torch.arange(cells, device=device) * stride + (stride - 1) // 2


def depth_average_matrix(
    depth: int,
    window: int = 3,
    stride: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[ceil(depth / stride), depth]`` matrix of :func:`aggregate_depth`: row ``i`` averages cell ``i``'s slices.

    Args:
        depth: Slices of the volume.
        window: Slices per cell.
        stride: Slices between cell centres.
        device: Where to build it.
        dtype: Its data type.
    """
    centres = depth_cell_centres(depth, window, stride, device=device)
    slices = torch.arange(depth, device=device)
    offsets = slices[None, :] - centres[:, None]
    members = ((offsets >= -((window - 1) // 2)) & (offsets <= window // 2)).to(dtype)  # [cells, depth]
    return members / members.sum(dim=1, keepdim=True).clamp(min=1.0)


def aggregate_depth(features: torch.Tensor, window: int = 3, stride: int = 3) -> torch.Tensor:
    """Mean over ``window`` neighbouring slices, one cell every ``stride`` slices, within ONE volume.

    Cell ``i`` is centred on slice ``c_i = i·stride + (stride - 1) // 2`` and averages slices
    ``c_i - (window-1)//2 .. c_i + window//2`` that exist (edge cells average fewer slices). With
    ``window = stride = 3`` this is the paper's disjoint triplets (96 slices → 32 cells); with
    ``stride = 1`` it keeps full depth resolution (``D`` cells, each the mean of its neighbours).

    One matrix product with :func:`depth_average_matrix` along the slice axis: no transpose of the
    feature volume and no 3-D pooling (which OpenVINO runs with a slow generic kernel).

    Args:
        features: ``[D, C, h, w]`` slice features of one volume, in depth order.
        window: Slices per cell (``>= stride`` so no slice is skipped).
        stride: Slices between cell centres.

    Returns:
        ``[ceil(D / stride), C, h, w]``.

    Raises:
        ValueError: ``stride`` outside ``1 .. window``.
    """
    if stride < 1 or window < stride:
        msg = f"depth aggregation needs 1 <= stride <= window, got window={window}, stride={stride}"
        raise ValueError(msg)
    if window == 1 and stride == 1:
        return features
    matrix = depth_average_matrix(features.shape[0], window, stride, device=features.device, dtype=features.dtype)
    return apply_separable(features, [matrix, None, None, None])


def _sinusoids(positions: torch.Tensor, dims: int) -> torch.Tensor:
    """``[len(positions), dims]`` sin/cos code with wavelengths from 2π to 10000·2π."""
    frequencies = torch.exp(
        torch.arange(0, dims, 2, device=positions.device, dtype=torch.float32) * -(math.log(10000.0) / dims)
    )
    angles = positions.float()[:, None] * frequencies[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def positional_encoding_1d(positions: torch.Tensor, dims: int) -> torch.Tensor:
    """Sinusoidal code ``[P, dims]`` of integer positions ``[P]`` (``dims`` even)."""
    if dims % 2:
        msg = f"a sinusoidal code needs an even number of dimensions, got {dims}"
        raise ValueError(msg)
    return _sinusoids(positions, dims)


def positional_encoding_2d(dims: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """2-D sinusoidal code ``[dims, h, w]``: the first half encodes the column, the second the row.

    Args:
        dims: Code size, a multiple of 4.
        height: Rows of the feature map.
        width: Columns of the feature map.
        device: Where to build it.
    """
    if dims % 4:
        msg = f"a 2-D sinusoidal code needs a multiple of 4 dimensions, got {dims}"
        raise ValueError(msg)
    half = dims // 2
    columns = _sinusoids(torch.arange(width, device=device), half)  # [w, half]
    rows = _sinusoids(torch.arange(height, device=device), half)  # [h, half]
    code_columns = columns.t()[:, None, :].expand(half, height, width)
    code_rows = rows.t()[:, :, None].expand(half, height, width)
    return torch.cat([code_columns, code_rows], dim=0)


def brain_cell_share(brain: torch.Tensor, grid: tuple[int, int], window: int = 3, stride: int = 3) -> torch.Tensor:
    """Share of brain voxels in each depth cell ``[ceil(D / stride), h, w]`` of ONE volume's mask ``[D, H, W]``.

    The same in-plane areas and slice groups as the features of those cells (:func:`aggregate_depth`).
    """
    share = F.adaptive_avg_pool2d(brain.float()[:, None], grid)
    return aggregate_depth(share, window, stride)[:, 0]


class FeatureStandardizer(nn.Module):
    """Per-dimension standardisation of the flow's inputs with statistics fixed from training features.

    Frozen slice features have a per-dimension spread of several units (about 3.5 for EfficientNet-Lite0's
    stride-4/8 stages on the phantom), so a fixed noise ``σ`` means something different for every backbone
    and stage; after standardisation ``σ`` is a share of each dimension's own spread. Until
    :meth:`fit` has run it is the identity. Its statistics are buffers: checkpoints and exported graphs
    carry them.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dims))
        self.register_buffer("std", torch.ones(dims))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, rows: torch.Tensor) -> None:
        """Take the mean and standard deviation of ``rows`` ``[M, C]`` (``M >= 2``)."""
        self.mean.copy_(rows.mean(dim=0))
        self.std.copy_(rows.std(dim=0).clamp_min(1e-6))
        self.fitted.fill_(True)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (rows - self.mean) / self.std
