"""PyTorch model of SimpleSliceNet: frozen slice encoder, depth mean, conditional flow, anomaly map.

In eval mode :meth:`SimpleSliceNetModel.forward` takes the ImageNet-normalised slices of ONE volume
``[D, 3, H, W]`` and returns an anomalib :class:`~anomalib.data.InferenceBatch` with the voxel map
``[D, H, W]`` and slice scores ``[D]``. The graph has no Python loop over slices and no data-dependent
branch, so it exports to ONNX/OpenVINO with a dynamic ``D``; for the same reason it never waits for
the device, runs under ``torch.compile`` and can be captured in a CUDA graph
(:class:`~simpleslicenet.models.cuda_graphs.CapturedCall`).

GPU options (both off by default; exported graphs are float32 whatever they say):

* ``precision="bf16"``: the slice encoder under bf16 autocast; the flow and the map stay float32
  (:mod:`.precision`).
* ``settings.compile_mode``: ``torch.compile`` the slice encoder and the flow (the modules that do the
  arithmetic, for inference and training alike) with this mode, e.g. ``"default"`` or
  ``"max-autotune-no-cudagraphs"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from anomalib.data import InferenceBatch
from torch import nn

from simpleslicenet.models.backbones import create_feature_extractor
from simpleslicenet.models.scoring import slice_scores

from .anomaly_map import AnomalyMapGenerator
from .conditions import PositionCodes
from .features import (
    FeatureStandardizer,
    SliceFeatureExtractor,
    aggregate_depth,
    brain_cell_share,
    depth_cell_centres,
    positional_encoding_1d,
)
from .flow import ConditionalFlow
from .settings import AUTO, CLAMP, CONDITION_DIM, DEPTH_CONDITION_DIM, SimpleSliceNetSettings

__all__ = ["SimpleSliceNetModel", "TrainingCells"]


@dataclass(frozen=True)
class TrainingCells:
    """The cells of one volume (or of a batch of independent images) that train the flow.

    Args:
        rows: ``[M, C]`` raw features of those cells (before the standardiser).
        keep: ``[n, h, w]`` which cells of the grid they are (``M`` true entries).
        depth: Slices of the volume they come from; ``None`` for independent images.
    """

    rows: torch.Tensor
    keep: torch.Tensor
    depth: int | None

    @property
    def nbytes(self) -> int:
        """Memory the record holds."""
        return sum(tensor.numel() * tensor.element_size() for tensor in (self.rows, self.keep))

    def to(self, device: torch.device | str) -> TrainingCells:
        """The same record on ``device``."""
        return TrainingCells(self.rows.to(device), self.keep.to(device), self.depth)


def _grid(cells: torch.Tensor) -> tuple[int, int, int]:
    """``(n, h, w)`` of a cell grid ``[n, C, h, w]``."""
    return (cells.shape[0], cells.shape[2], cells.shape[3])


class SimpleSliceNetModel(nn.Module):
    """Slice encoder + depth aggregation + conditional normalizing flow.

    Args:
        settings: What the model is (:class:`.settings.SimpleSliceNetSettings`); ``"auto"`` stages are the
            stride-8/16 ones, an ``"auto"`` padding the coarsest stage's stride and an ``"auto"`` smoothing
            4 voxels until the training data resolve them.
        precision: ``"fp32"`` or ``"bf16"`` (slice encoder under bf16 autocast; see :mod:`.precision`).

    Raises:
        ValueError: An unknown precision, or a ``slice_padding`` that is not a multiple of the finest
            stage's stride.
    """

    def __init__(self, settings: SimpleSliceNetSettings | None = None, precision: str = "fp32") -> None:
        super().__init__()
        settings = settings if settings is not None else SimpleSliceNetSettings()
        self.settings = settings
        layers = None if settings.layers == AUTO else list(settings.layers)
        extractor = create_feature_extractor(settings.backbone, layers, settings.backbone_weights)
        strides = extractor.feature_info.reduction()
        self.encoder = SliceFeatureExtractor(
            extractor,
            layer_channels=extractor.feature_info.channels(),
            embed_dim=settings.embed_dim,
            neighbourhood=settings.neighbourhood,
            precision=precision,
            padding=max(strides) if settings.slice_padding == AUTO else int(settings.slice_padding),
            stride=min(strides),
        )
        self.feature_dim = self.encoder.out_dim
        # The paper's variant has no standardiser, so its state dict is the paper's model's.
        self.standardizer = FeatureStandardizer(self.feature_dim) if settings.standardize_features else None
        self.flow = ConditionalFlow(
            dims=self.feature_dim,
            condition_dims=CONDITION_DIM + (DEPTH_CONDITION_DIM if settings.depth_position else 0),
            blocks=settings.flow_blocks,
            clamp=CLAMP,
        )
        self.anomaly_map_generator = AnomalyMapGenerator(peak=settings.paper)
        self.retune(settings)
        if settings.compile_mode is not None:
            # In place (nn.Module.compile): parameters, state dict and every caller stay as they are.
            self.encoder.compile(mode=settings.compile_mode)
            self.flow.compile(mode=settings.compile_mode)

    def retune(self, settings: SimpleSliceNetSettings) -> None:
        """Take settings that build the same modules (:meth:`.settings.SimpleSliceNetSettings.same_graph`).

        Raises:
            ValueError: ``settings`` would build other modules.
        """
        if not settings.same_graph(self.settings):
            msg = f"these settings need a new model: {settings}"
            raise ValueError(msg)
        self.settings = settings
        self.anomaly_map_generator.sigma = settings.sigma_voxels if settings.smooths_in_graph else 0.0

    # ----------------------------------------------------------------- features and their conditions
    def conditions(self, grid: Sequence[int], depth: int | None, device: torch.device | None = None) -> PositionCodes:
        """Conditions of every cell of a grid ``(n, h, w)``, in :meth:`to_rows` order.

        A condition is the 2-D code (the column's half, then the row's) and, with ``depth_position``, the
        depth cell's code.

        Args:
            grid: Cells ``(n, h, w)``.
            depth: Slices of the volume whose depth cells the ``n`` rows are (used with ``depth_position``);
                ``None``: ``n`` independent images, with a zero depth code.
            device: Where to build it.
        """
        count, height, width = grid
        half = CONDITION_DIM // 2
        columns = positional_encoding_1d(torch.arange(width, device=device), half)
        rows = positional_encoding_1d(torch.arange(height, device=device), half)
        # One table of in-plane codes, cell (y, x) at y·w + x: a slice has few cells, and one gather per
        # row is cheaper than a gather per axis.
        plane = torch.cat([columns.repeat(height, 1), rows.repeat_interleave(width, dim=0)], dim=1)
        if not self.settings.depth_position:
            return PositionCodes.on_grid((plane,), grid, axes=(None, 0, 0))
        if depth is None:
            depth_code = columns.new_zeros(count, DEPTH_CONDITION_DIM)
        else:
            centres = depth_cell_centres(depth, self.settings.depth_window, self.settings.depth_stride, device=device)
            depth_code = positional_encoding_1d(centres, DEPTH_CONDITION_DIM)
        return PositionCodes.on_grid((plane, depth_code), grid, axes=(1, 0, 0))

    def depth_cells(self, features: torch.Tensor) -> torch.Tensor:
        """Depth cells ``[n, C, h, w]`` of one volume's slice features ``[D, C, h, w]``."""
        return aggregate_depth(features, self.settings.depth_window, self.settings.depth_stride)

    def volume_cells(self, features: torch.Tensor) -> tuple[torch.Tensor, PositionCodes]:
        """Depth cells ``[n, C, h, w]`` of one volume's slice features and their conditions."""
        cells = self.depth_cells(features)
        return cells, self.conditions(_grid(cells), features.shape[0], cells.device)

    @staticmethod
    def to_rows(grid: torch.Tensor) -> torch.Tensor:
        """``[n, C, h, w]`` → ``[n·h·w, C]``, one row per location."""
        return grid.permute(0, 2, 3, 1).flatten(0, 2)

    def flow_inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """Feature rows as the flow takes them (standardised when the model standardises)."""
        return rows if self.standardizer is None else self.standardizer(rows)

    @torch.no_grad()
    def training_cells(
        self,
        images: torch.Tensor,
        volumes: Sequence[slice] | None = None,
        brain: torch.Tensor | None = None,
    ) -> list[TrainingCells]:
        """The frozen encoder's part of training: the cells of each volume in ``images`` that train the flow.

        Args:
            images: ImageNet-normalised slices ``[N, 3, H, W]``.
            volumes: Rows of each whole volume in ``images``; depth cells never mix volumes.
                ``None`` treats the rows as independent images (no depth aggregation), one part.
            brain: Brain masks ``[N, H, W]`` of the slices: keep only the cells that hold brain
                (``None``: every cell).
        """
        features = self.encoder(images)
        grid = tuple(features.shape[-2:])
        window, stride = self.settings.depth_window, self.settings.depth_stride
        if volumes is None:
            parts = [(features, None, None if brain is None else brain_cell_share(brain, grid, window=1, stride=1))]
        else:
            parts = [
                (
                    self.depth_cells(features[rows]),
                    features[rows].shape[0],
                    None if brain is None else brain_cell_share(brain[rows], grid, window, stride),
                )
                for rows in volumes
            ]
        training = []
        for cells, depth, share in parts:
            keep = torch.ones(_grid(cells), dtype=torch.bool, device=cells.device) if share is None else share > 0
            training.append(TrainingCells(rows=self.to_rows(cells)[keep.flatten()], keep=keep, depth=depth))
        return training

    def flow_batch(self, parts: Sequence[TrainingCells]) -> tuple[torch.Tensor, PositionCodes]:
        """Flow inputs ``[M, C]`` and their conditions of training cells, in order.

        The first call fits the standardiser (``standardize_features``) on its rows.
        """
        with torch.no_grad():
            rows = torch.cat([part.rows for part in parts])
            # One grid as deep as the deepest part: a depth cell's code depends on its place alone.
            deepest = max(parts, key=lambda part: part.keep.shape[0])
            conditions = self.conditions(deepest.keep.shape, deepest.depth, deepest.keep.device)
            kept = [conditions.index[: part.keep.numel()][part.keep.flatten()] for part in parts]
            conditions = PositionCodes(conditions.tables, torch.cat(kept))
            if self.standardizer is not None and not bool(self.standardizer.fitted):
                self.standardizer.fit(rows)
            return self.flow_inputs(rows), conditions

    def training_features(
        self,
        images: torch.Tensor,
        volumes: Sequence[slice] | None = None,
        brain: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PositionCodes]:
        """Flow inputs ``[M, C]`` and their conditions of a training batch (:meth:`training_cells`, :meth:`flow_batch`)."""
        return self.flow_batch(self.training_cells(images, volumes, brain))

    # ----------------------------------------------------------------------------------- inference
    def log_likelihood_grid(self, cells: torch.Tensor, conditions: PositionCodes) -> torch.Tensor:
        """Per-dimension log-likelihood ``[n, h, w]`` of a feature grid ``[n, C, h, w]`` and its :meth:`conditions`."""
        count, _, height, width = cells.shape
        log_likelihood = self.flow.log_likelihood(self.flow_inputs(self.to_rows(cells)), conditions)
        return log_likelihood.view(count, height, width)

    def predict_volume(self, images: torch.Tensor) -> torch.Tensor:
        """Raw voxel map ``[D, H, W]`` of ONE volume's slices ``[D, 3, H, W]``."""
        depth, _, height, width = images.shape
        return self.map_of_cells(self.depth_cells(self.encoder(images)), (depth, height, width))

    def map_of_cells(self, cells: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Raw voxel map ``[D, H, W]`` of one volume's depth cells ``[n, C, h, w]`` (:meth:`depth_cells`).

        Args:
            cells: The cells of a volume of ``shape``.
            shape: ``(D, H, W)`` of its slices.
        """
        conditions = self.conditions(_grid(cells), shape[0], cells.device)
        return self.anomaly_map_generator.volume_map(self.log_likelihood_grid(cells, conditions), tuple(shape))

    def predict_images(self, images: torch.Tensor) -> InferenceBatch:
        """Pixel maps ``[N, H, W]`` and image scores ``[N]`` of independent images ``[N, 3, H, W]``."""
        features = self.encoder(images)
        log_likelihood = self.log_likelihood_grid(features, self.conditions(_grid(features), None, features.device))
        anomaly_map = self.anomaly_map_generator.image_maps(log_likelihood, tuple(images.shape[-2:]))
        return InferenceBatch(pred_score=slice_scores(anomaly_map), anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch | tuple[torch.Tensor, PositionCodes]:
        """Training: flow inputs and conditions of one volume (or images); eval: its prediction.

        Args:
            images: ImageNet-normalised ``[D, 3, H, W]`` slices of one volume (``volumetric``) or
                ``[N, 3, H, W]`` independent images.
        """
        if self.training:
            return self.training_features(images, [slice(0, images.shape[0])] if self.settings.volumetric else None)
        if not self.settings.volumetric:
            return self.predict_images(images)
        # The exported graph's outputs; brain restriction and volume scores follow outside it.
        anomaly_map = self.predict_volume(images)
        return InferenceBatch(pred_score=slice_scores(anomaly_map), anomaly_map=anomaly_map)
