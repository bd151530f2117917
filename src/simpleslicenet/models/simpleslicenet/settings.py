"""SimpleSliceNet's settings: one frozen record shared by the Lightning module and the torch model.

The record holds exactly what a user sets (:class:`SimpleSliceNet`'s own arguments, one set of
defaults), is validated once on construction, and is what checkpoints store as hyper-parameters.
Three settings may be ``"auto"``: :meth:`SimpleSliceNetSettings.resolved` fills them in from the
training data in one step, and the model stores the result, so a checkpoint says exactly which model
it holds.

``variant`` selects the behaviour around those settings:

* ``"package"`` (the default): the flow is conditioned on the depth of each cell as well as its in-plane
  position, its inputs are standardised per dimension, only cells that hold brain train it, and a scan's
  map is its smoothed negative log-likelihood minus that of its median brain voxel, smoothed within the
  brain mask by the shared scoring step.
* ``"paper"``: Zhang & Mohsenzadeh's model: an in-plane position code only, the raw features of every
  cell, 4,096 features a flow step, and the map ``1 − exp(ℓ − max ℓ)`` of the log-likelihood smoothed
  over the whole slab.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simpleslicenet.choices import check_choice
from simpleslicenet.models.backbones import DEFAULT_BACKBONE, layers_for_slice_size
from simpleslicenet.models.scoring import VolumeScoring
from simpleslicenet.records import SettingsRecord

from .loss import LOSSES

__all__ = [
    "AUTO",
    "CLAMP",
    "CONDITION_DIM",
    "DEPTH_CONDITION_DIM",
    "MODES",
    "NOISE_STD",
    "VARIANTS",
    "SimpleSliceNetSettings",
]

AUTO = "auto"
VARIANTS = ("package", "paper")
MODES = ("auto", "3d", "2d")

# Fixed by the paper and kept by the package.
CLAMP = 1.9  # affine clamping of the flow's couplings
CONDITION_DIM = 128  # size of the 2-D sinusoidal position code
NOISE_STD = 0.08  # σ of the Gaussian noise that makes pseudo-anomalous features
# Size of the depth code the package variant appends to the position code.
DEPTH_CONDITION_DIM = 32
# Gaussian smoothing of the map: the paper's σ is 4 voxels of 1 mm.
PAPER_SIGMA_MM = 4.0
# Features per flow optimisation step: the paper's 4,096, or four times as many steps on small training sets.
PAPER_FEATURES_PER_STEP = 4096
PACKAGE_FEATURES_PER_STEP = 1024
# The settings that shape the torch model's modules; the others can change on a built model.
GRAPH_SETTINGS = (
    "backbone", "layers", "backbone_weights", "embed_dim", "neighbourhood", "slice_padding",
    "depth_window", "depth_stride", "flow_blocks", "variant", "mode", "compile_mode",
)


@dataclass(frozen=True)
class SimpleSliceNetSettings(SettingsRecord):
    """What a SimpleSliceNet is; see :class:`~simpleslicenet.models.simpleslicenet.SimpleSliceNet` for each setting.

    Raises:
        ValueError: A setting out of its range or not one of its named values.
    """

    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str | int, ...] | str = AUTO
    backbone_weights: str = "imagenet"
    embed_dim: int | None = None
    neighbourhood: int = 3
    slice_padding: int | str = AUTO
    depth_window: int = 3
    depth_stride: int = 3
    flow_blocks: int = 8
    loss: str = "triplet"
    lr: float = 1e-3
    smoothing_sigma: float | str = AUTO
    variant: str = "package"
    mode: str = "auto"
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("mode", self.mode, MODES)
        check_choice("loss", self.loss, LOSSES)
        if isinstance(self.backbone_weights, os.PathLike):
            object.__setattr__(self, "backbone_weights", os.fspath(self.backbone_weights))
        if self.layers != AUTO:
            if isinstance(self.layers, str) or not isinstance(self.layers, Sequence) or not self.layers:
                msg = f"layers must be 'auto' or a list of backbone stages, got {self.layers!r}"
                raise ValueError(msg)
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.smoothing_sigma != AUTO:
            if isinstance(self.smoothing_sigma, bool) or not isinstance(self.smoothing_sigma, int | float):
                msg = f"smoothing_sigma must be a number of voxels or 'auto', got {self.smoothing_sigma!r}"
                raise ValueError(msg)
            if not 0 <= self.smoothing_sigma < float("inf"):
                msg = f"smoothing_sigma must be a finite number of voxels >= 0, got {self.smoothing_sigma!r}"
                raise ValueError(msg)
            object.__setattr__(self, "smoothing_sigma", float(self.smoothing_sigma))
        if self.slice_padding != AUTO and (not isinstance(self.slice_padding, int) or self.slice_padding < 0):
            msg = f"slice_padding must be a number of pixels >= 0 or 'auto', got {self.slice_padding!r}"
            raise ValueError(msg)
        if not 1 <= self.depth_stride <= self.depth_window:
            msg = (
                "need 1 <= depth_stride <= depth_window, got "
                f"depth_window={self.depth_window}, depth_stride={self.depth_stride}"
            )
            raise ValueError(msg)
        for name in ("neighbourhood", "flow_blocks"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if self.embed_dim is not None and self.embed_dim < 1:
            msg = f"embed_dim must be at least 1 or None, got {self.embed_dim!r}"
            raise ValueError(msg)
        if not self.lr > 0:
            msg = f"lr must be positive, got {self.lr!r}"
            raise ValueError(msg)

    # --------------------------------------------------------------------------- what follows from them
    @property
    def paper(self) -> bool:
        """Whether the paper's behaviour applies (``variant="paper"``)."""
        return self.variant == "paper"

    @property
    def volumetric(self) -> bool:
        """Whether the torch model's ``forward`` takes one volume (``False``: independent 2-D images)."""
        return self.mode != "2d"

    @property
    def depth_position(self) -> bool:
        """Whether the flow's condition also codes each cell's depth."""
        return not self.paper

    @property
    def standardize_features(self) -> bool:
        """Whether the flow's inputs are standardised per dimension (statistics of the first training batch)."""
        return not self.paper

    @property
    def train_on_brain_cells(self) -> bool:
        """Whether only cells that hold brain train the flow (batches without a brain mask train on all)."""
        return not self.paper

    @property
    def features_per_step(self) -> int:
        """Features per flow optimisation step."""
        return PAPER_FEATURES_PER_STEP if self.paper else PACKAGE_FEATURES_PER_STEP

    @property
    def unresolved(self) -> tuple[str, ...]:
        """Names of the settings still ``"auto"``."""
        return tuple(name for name in ("layers", "smoothing_sigma", "slice_padding") if getattr(self, name) == AUTO)

    @property
    def sigma_voxels(self) -> float:
        """The smoothing in voxels; until the training data resolve ``"auto"``, the paper's 4 voxels of 1 mm."""
        return PAPER_SIGMA_MM if self.smoothing_sigma == AUTO else float(self.smoothing_sigma)

    @property
    def smooths_in_graph(self) -> bool:
        """Whether the graph smooths the map over the whole slab (the paper's map, and independent images).

        Otherwise the scoring step smooths it within the brain mask, which the graph does not take.
        """
        return self.paper or not self.volumetric

    def scoring(self) -> VolumeScoring:
        """The scoring step's part of the map: centring on the median brain voxel and smoothing within the brain."""
        if self.smooths_in_graph:
            return VolumeScoring()
        return VolumeScoring(map_reference="brain_median", smoothing_sigma=self.sigma_voxels)

    # ------------------------------------------------------------------------------------ resolving
    def resolved(self, slice_size: Sequence[int] | None, spacing_mm: float | None) -> SimpleSliceNetSettings:
        """The same settings with ``"auto"`` filled in from the training data.

        Args:
            slice_size: ``(H, W)`` of the training slices: ``layers="auto"`` takes the two consecutive
                stages whose finer one gives about 24×24 locations (the paper's grid on 192×192 slices);
                ``None`` keeps the stride-8/16 stages.
            spacing_mm: Voxel size of the training scans: ``smoothing_sigma="auto"`` is 4 mm in voxels
                (the paper's 4 voxels where unknown).

        ``slice_padding="auto"`` follows the stages: the model resolves it when it is built.
        """
        changes: dict[str, Any] = {}
        if self.layers == AUTO and slice_size is not None:
            changes["layers"] = tuple(layers_for_slice_size(self.backbone, tuple(slice_size)))
        if self.smoothing_sigma == AUTO:
            changes["smoothing_sigma"] = PAPER_SIGMA_MM / spacing_mm if spacing_mm else PAPER_SIGMA_MM
        return dataclasses.replace(self, **changes)

    def same_graph(self, other: SimpleSliceNetSettings) -> bool:
        """Whether ``other`` builds the same torch model (it may differ in smoothing, loss and learning rate)."""
        return all(getattr(self, name) == getattr(other, name) for name in GRAPH_SETTINGS)

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> SimpleSliceNetSettings:
        """The settings among a checkpoint's hyper-parameters (which also hold anomalib's own arguments)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in hparams.items() if key in names})

