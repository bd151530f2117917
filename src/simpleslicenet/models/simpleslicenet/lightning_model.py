"""SimpleSliceNet: efficient slice anomaly detection for 3-D brain MRI volumes (Lightning module).

A frozen 2-D ImageNet backbone embeds every axial slice; neighbourhood-averaged, channel-pooled
features of neighbouring slices are averaged in depth and a conditional normalizing flow learns
their density on healthy volumes, contrasted with Gaussian-noised copies. Unlikely locations form
the anomaly map, upsampled to the volume and smoothed in 3-D.

Example:
    >>> from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    >>> model = SimpleSliceNet(flow_blocks=2)
    >>> model.model.feature_dim
    152

Paper:
    Title: Efficient Slice Anomaly Detection Network for 3D Brain MRI Volume
    Authors: Zhang, Mohsenzadeh
    URL: https://arxiv.org/abs/2408.15958
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from simpleslicenet.choices import check_choice
from simpleslicenet.models.backbones import DEFAULT_BACKBONE, imagenet_pre_processor, layers_for_slice_size
from simpleslicenet.models.scoring import VolumeScoring, slice_scores
from simpleslicenet.models.volume_model import VolumeModelMixin

from .loss import add_feature_noise, create_loss
from .torch_model import SimpleSliceNetModel

__all__ = ["SimpleSliceNet", "fit_flow_on_features"]

logger = logging.getLogger(__name__)

MODES = ("auto", "3d", "2d")
# How noise_std is measured: in feature units, or as a share of each dimension's spread in the batch.
NOISE_SCALES = ("absolute", "feature_std")
# Which depth cells train the flow: all of them, or those that hold brain.
TRAIN_CELLS = ("all", "brain")
# What a volume's map is measured against: its median brain voxel, or its most likely cell (the paper's).
MAP_REFERENCES = ("brain_median", "peak")
# Where the map is smoothed: over the brain's voxels only (in the scoring step, which has the brain mask),
# or over the whole slab (in the graph, the paper's).
SMOOTHING_REGIONS = ("brain", "volume")


AUTO = "auto"
# Settings that "auto" leaves to the training data (SimpleSliceNet.setup).
RESOLVED_FROM_DATA = ("layers", "smoothing_sigma")
# The paper smooths with sigma = 4 voxels of 1 mm.
PAPER_SIGMA_VOXELS = 4.0
PAPER_SIGMA_MM = 4.0


def _stages(value: object) -> object:
    """``layers`` (or any setting) in a comparable form: lists and tuples alike, ``"auto"`` as built (``None``)."""
    if value == AUTO:
        return None
    return list(value) if isinstance(value, list | tuple) else value


def _training_slices(datamodule: object) -> tuple[tuple[int, int] | None, float | None]:
    """Slice size ``(H, W)`` and voxel size in mm of a datamodule's volumes (``None`` where unknown)."""
    preprocessing = getattr(datamodule, "preprocessing", None)
    shape = getattr(preprocessing, "target_shape", None)
    spacing = getattr(preprocessing, "spacing_mm", None)
    if shape is not None:
        return (int(shape[0]), int(shape[1])), spacing
    train_data = getattr(datamodule, "train_data", None)
    if train_data is not None and len(train_data) > 0:
        return tuple(int(n) for n in train_data[0].image.shape[-2:]), spacing
    return None, spacing


def fit_flow_on_features(
    flow: nn.Module,
    loss_function: nn.Module,
    features: torch.Tensor,
    conditions: torch.Tensor,
    optimizer: optim.Optimizer,
    features_per_step: int = 4096,
    noise_std: float | Sequence[float] = 0.08,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    noise_scale: str = "absolute",
) -> torch.Tensor:
    """One pass over a batch's features in random order, one optimiser step per ``features_per_step``.

    Each step puts the normal features and their noised copies through the flow together and
    applies ``loss_function(normal_log_likelihood, noised_log_likelihood)``.

    Args:
        flow: :class:`~simpleslicenet.models.simpleslicenet.flow.ConditionalFlow`.
        loss_function: Loss on paired per-dimension log-likelihoods.
        features: ``[M, C]`` flow inputs (no gradient).
        conditions: ``[M, P]`` their conditions.
        optimizer: Optimiser of the flow.
        features_per_step: Features per step (the last step takes the rest).
        noise_std: ``σ`` of the pseudo-anomaly noise, or several to mix.
        backward: How to back-propagate (Lightning's ``manual_backward`` inside a Trainer).
        noise_scale: ``"absolute"`` (``σ`` in feature units) or ``"feature_std"`` (``σ`` times each
            dimension's standard deviation over ``features``).

    Returns:
        Mean loss over the steps (detached).
    """
    check_choice("noise_scale", noise_scale, NOISE_SCALES)
    scale = features.std(dim=0) if noise_scale == "feature_std" else None
    order = torch.randperm(features.shape[0], device=features.device)
    losses = []
    for chunk in order.split(features_per_step):
        normal = features[chunk]
        condition = conditions[chunk]
        noised = add_feature_noise(normal, noise_std, scale=scale)
        # Normal features and their noised copies in one flow pass.
        log_likelihood = flow.log_likelihood(torch.cat([normal, noised]), condition.repeat(2, 1))
        normal_ll, noised_ll = log_likelihood.split(normal.shape[0])
        loss = loss_function(normal_ll, noised_ll)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


class SimpleSliceNet(VolumeModelMixin, AnomalibModule):
    """SimpleSliceNet as an anomalib one-class model.

    A batch is a :class:`~simpleslicenet.data.batch.VolumeBatch` of one or more whole volumes (their
    slices in order); depth cells never mix volumes. In ``"2d"`` mode (or ``"auto"`` on a batch
    without ``volume_index``) it trains and predicts on independent images, without depth aggregation.

    Args:
        backbone: timm backbone (offline default ``tf_efficientnet_lite0``; paper ``wide_resnet50_2``).
        layers: Backbone stages by name (``["layer2", "layer3"]``) or feature-info index; ``None``:
            the stride-8 and stride-16 stages; ``"auto"``: chosen when training starts from the
            training slices' size, so the finer stage gives about 24×24 locations as the paper's
            stages do on 192×192 slices (stride 4/8 on 96×96 slices), and stored with the model.
        backbone_weights: ``"imagenet"``, a local ``.pth``/``.safetensors`` file, or ``"random"``.
        embed_dim: Feature size per location (paper: 512); ``None`` concatenates the stages' channels.
        neighbourhood: Local averaging window on each feature map, in cells (paper: 3).
        slice_padding: Pixels of background (each slice's darkest value) added around each slice before
            the backbone, so its zero padding (mid-grey after ImageNet normalisation) never lies against
            the brain.
            ``"auto"`` (the default): the coarsest stage's stride (8 pixels at stride 4/8, 16 at 8/16);
            ``0``: none, the paper's. On the phantom it raised voxel AUPRC and volume AUROC (README
            "Detection", round 10); models saved before it existed load with ``0``.
        depth_window: Slices averaged per depth cell (paper: 3).
        depth_stride: Slices between depth cells (paper: 3; 1 keeps full depth resolution).
        full_depth_windows: The depth cells at the slab's ends average ``depth_window`` slices like
            every other cell (their window shifted inwards, their depth code unchanged) instead of the
            fewer that exist there (``False``, the default and the paper's). It changes nothing where
            the slices divide into whole windows (the paper's triplets on 96 slices); with a cell on
            every slice it lowered volume AUROC in six of nine phantom runs (README "Detection", round 11).
            Models saved before it existed load with ``False``.
        flow_blocks: Coupling blocks of the flow (paper: 8).
        clamp: Affine clamping of the couplings (paper: 1.9).
        condition_dim: Size of the 2-D sinusoidal position code (paper: 128).
        depth_position: Also condition the flow on the depth of each cell (the default: the flow then
            knows where in the slab a cell lies, which raised voxel AUPRC on the phantom by about a
            third; the paper conditions on the in-plane position only).
        noise_std: ``σ`` of the Gaussian noise that makes pseudo-anomalous features (paper: 0.08), or
            a list of ``σ`` to mix.
        noise_scale: ``"absolute"`` (the paper's: ``σ`` in feature units, where EfficientNet-Lite0's
            features spread by about 3.5 per dimension) or ``"feature_std"`` (``σ`` times each dimension's
            spread over the training batch).
        standardize_features: Standardise the flow's inputs per dimension with statistics fixed on the
            first training batch (then ``σ`` is a share of each dimension's spread too; the default:
            with ``train_cells="brain"`` it raised voxel AUPRC and Dice on the phantom, README
            "Detection"; the paper feeds the raw features).
        train_cells: ``"brain"`` (the default): only depth cells that hold brain train the flow, so
            background cells, about half of a slab, no longer take its capacity; batches without a brain
            mask (independent 2-D images) train on every cell. ``"all"``: every cell (the paper's).
        loss: ``"triplet"`` (this package's per-feature margin; the default, it beat the paper's loss on
            the phantom), ``"bgspp"`` (the paper's boundary-guided semi-push-pull, arXiv v1) or
            ``"authors_triplet"`` (the authors' final code: one triplet margin between whole likelihood
            vectors); see :mod:`.loss`.
        lr: Adam learning rate of the flow (paper: 1e-3).
        features_per_step: Features per flow optimisation step (paper: 4096; the default 1024 takes four
            times as many steps, which small training sets need); every feature of the
            batch is used once per training step, in random order.
        smoothing_sigma: 3-D Gaussian smoothing of the map in voxels (paper: 4 at 1 mm); ``"auto"``:
            4 mm in the training scans' voxels (2 at 2 mm), resolved and stored like ``layers``.
        map_order: ``"smooth_then_score"`` (smooth ``ℓ`` first, as the authors' code does; the default)
            or ``"score_then_smooth"`` (smooth ``1 − exp(ℓ − max ℓ)``); see :data:`.anomaly_map.MAP_ORDERS`.
            Applies with ``map_reference="peak"``.
        map_reference: What a volume's map is measured against. ``"brain_median"`` (the default): the
            map is the smoothed negative log-likelihood minus that of the volume's median brain voxel, so
            0 is the scan's typical brain tissue and a lesion scores its deficit in nats per feature
            dimension; on the phantom it raised volume AUROC, Dice and lesions found over the paper's
            ``"peak"``: ``1 − exp(ℓ − max ℓ)``, measured against the volume's single most likely cell
            (README "Detection"). The centring needs the brain mask, so it is part of the scoring step
            (:class:`~simpleslicenet.models.scoring.VolumeScoring`), also in deployment.
        smoothing_region: Where ``smoothing_sigma`` smooths the map. ``"brain"``: over the brain's voxels
            only, in the scoring step (it needs the brain mask). The flow, trained on brain cells, scores
            background cells far higher than any tissue; smoothed over the whole slab, that background
            seeped into the brain's edge, where healthy scans then had their hottest voxels (README
            "Detection"). ``"volume"``: over the whole slab, inside the graph (the paper's; ``"peak"``
            needs it, as its ``1 − exp(ℓ − max ℓ)`` follows the smoothing). ``"auto"`` (the default):
            ``"brain"`` with ``"brain_median"``, ``"volume"`` with ``"peak"``.
        volume_score_mode: ``"max"`` or ``"topk_mean"`` of the brain-masked voxel map.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        mode: ``"auto"``, ``"3d"`` or ``"2d"``.
        channels_last: Channels-last layout for the backbone and its input (faster convolutions on GPUs).
        compile_mode: ``torch.compile`` the slice encoder and the flow with this mode (e.g. ``"default"``);
            ``None``: eager. For bf16, train and test with the trainer's ``precision="bf16-mixed"``: the
            encoder then runs in bf16 while the flow and the map stay float32.
        pre_processor: Pre-processor, or ``True`` for ImageNet normalisation only.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default.
        visualizer: Visualizer, or ``True`` for none (anomalib's image visualizer cannot open NIfTI).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str | int] | Literal["auto"] | None = AUTO,
        backbone_weights: str | os.PathLike | None = "imagenet",
        embed_dim: int | None = None,
        neighbourhood: int = 3,
        slice_padding: int | Literal["auto"] = AUTO,
        depth_window: int = 3,
        depth_stride: int = 3,
        full_depth_windows: bool = False,
        flow_blocks: int = 8,
        clamp: float = 1.9,
        condition_dim: int = 128,
        depth_position: bool = True,
        noise_std: float | Sequence[float] = 0.08,
        noise_scale: Literal["absolute", "feature_std"] = "absolute",
        standardize_features: bool = True,
        train_cells: Literal["all", "brain"] = "brain",
        loss: str = "triplet",
        lr: float = 1e-3,
        features_per_step: int = 1024,
        smoothing_sigma: float | Literal["auto"] = AUTO,
        map_order: Literal["score_then_smooth", "smooth_then_score"] = "smooth_then_score",
        map_reference: Literal["brain_median", "peak"] = "brain_median",
        smoothing_region: Literal["auto", "brain", "volume"] = AUTO,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        mode: str = "auto",
        channels_last: bool = False,
        compile_mode: str | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if mode == "2d":
            # Plain images carry no brain mask or volume index: anomalib's own image/pixel metrics and
            # its normalising, thresholding post-processor, as for any anomalib image model.
            evaluator = AnomalibModule.configure_evaluator() if evaluator is True else evaluator
            post_processor = PostProcessor() if post_processor is True else post_processor
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        check_choice("mode", mode, MODES)
        self.scoring = VolumeScoring(volume_score_mode, topk_fraction)
        check_choice("noise_scale", noise_scale, NOISE_SCALES)
        check_choice("train_cells", train_cells, TRAIN_CELLS)
        if features_per_step < 2:
            msg = f"features_per_step must be at least 2, got {features_per_step}"
            raise ValueError(msg)
        if not (layers == AUTO or layers is None or isinstance(layers, Sequence) and not isinstance(layers, str)):
            msg = f"layers must be 'auto', None or a list of stages, got {layers!r}"
            raise ValueError(msg)
        if smoothing_sigma != AUTO and not isinstance(smoothing_sigma, int | float):
            msg = f"smoothing_sigma must be a number of voxels or 'auto', got {smoothing_sigma!r}"
            raise ValueError(msg)
        self._model_arguments = {
            "backbone": backbone,
            "layers": layers,
            "backbone_weights": backbone_weights,
            "embed_dim": embed_dim,
            "neighbourhood": neighbourhood,
            "slice_padding": slice_padding,
            "depth_window": depth_window,
            "depth_stride": depth_stride,
            "full_depth_windows": full_depth_windows,
            "flow_blocks": flow_blocks,
            "clamp": clamp,
            "condition_dim": condition_dim,
            "depth_position": depth_position,
            "standardize_features": standardize_features,
            "smoothing_sigma": smoothing_sigma,
            "map_order": map_order,
            "map_reference": "none",  # the graph's part of map_reference: set_map_settings below
            "volumetric": mode != "2d",
            "channels_last": channels_last,
            "compile_mode": compile_mode,
        }
        # Until the training data resolve them, "auto" settings stand for the paper's 1 mm ones.
        self.model = self._build_model(layers=None if layers == AUTO else layers, smoothing_sigma=self._sigma_voxels)
        self.set_map_settings(map_reference, smoothing_region)
        self.loss = create_loss(loss)
        self.noise_std = list(noise_std) if isinstance(noise_std, Sequence) else float(noise_std)
        self.noise_scale = noise_scale
        self.train_cells = train_cells
        self.learning_rate = lr
        self.features_per_step = features_per_step
        self.mode = mode
        # Several flow steps per volume: the loop lives in training_step.
        self.automatic_optimization = False

    # ----------------------------------------------------------------------- settings from the data
    def _build_model(self, **changes: Any) -> SimpleSliceNetModel:  # noqa: ANN401
        return SimpleSliceNetModel(**{**self._model_arguments, **changes})

    def setup(self, stage: str) -> None:
        """Resolve ``"auto"`` settings from the datamodule, before the optimiser is built.

        The resolved values replace ``"auto"`` in the hyper-parameters, so a checkpoint rebuilds the
        same model wherever it is loaded.
        """
        super().setup(stage)
        if self.hparams.get("layers") != AUTO and self.hparams.get("smoothing_sigma") != AUTO:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        slice_size, spacing_mm = _training_slices(datamodule)
        changes: dict[str, Any] = {}
        if self.hparams.get("layers") == AUTO:
            if slice_size is None:
                logger.warning("no slice size known before training: layers='auto' keeps the stride-8/16 stages")
            changes["layers"] = None if slice_size is None else layers_for_slice_size(self.model_backbone, slice_size)
        if self.hparams.get("smoothing_sigma") == AUTO:
            changes["smoothing_sigma"] = PAPER_SIGMA_MM / spacing_mm if spacing_mm else PAPER_SIGMA_VOXELS
        logger.info("SimpleSliceNet settings from the training data (slices %s, %s mm): %s", slice_size, spacing_mm, changes)
        self._take_settings(changes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's resolved ``layers``, smoothing, padding and end cells before its weights are loaded.

        So ``trainer.test(model, ckpt_path=...)`` works whatever this instance was built with. A
        checkpoint keeps the map settings it was made with (see :meth:`set_map_settings`).
        """
        stored = checkpoint.get("hyper_parameters") or {}
        # Saved before these settings existed: its slices went in bare, its end cells averaged the slices they had.
        taken = {"slice_padding": 0, "full_depth_windows": False} if stored else {}
        taken |= {key: stored[key] for key in (*RESOLVED_FROM_DATA, "slice_padding", "full_depth_windows") if key in stored}
        changes = {
            key: value
            for key, value in taken.items()
            # An unresolved "auto" (a model never trained) leaves this instance's value.
            if not (key in RESOLVED_FROM_DATA and value == AUTO) and _stages(value) != _stages(self._model_arguments[key])
        }
        if changes:
            self._take_settings(changes)
        if stored:
            # A checkpoint saved before a setting existed made its map the way it was then: the paper's
            # map (stored with uncentred scoring), smoothed over the whole slab.
            self.set_map_settings(stored.get("map_reference", "peak"), stored.get("smoothing_region", "volume"))
        # The stored scoring record (with its smoothing) replaces this instance's here.
        super().on_load_checkpoint(checkpoint)

    def _take_settings(self, changes: dict[str, Any]) -> None:
        """Rebuild the torch model (new stages, padding or end cells) or retune its smoothing, and record the values."""
        rebuild = any(
            key in changes and _stages(changes[key]) != _stages(self._model_arguments[key])
            for key in ("layers", "slice_padding", "full_depth_windows")
        )
        self._model_arguments.update(changes)
        self.hparams.update(changes)
        if rebuild:
            layers = _stages(self._model_arguments["layers"])
            self.model = self._build_model(layers=layers, smoothing_sigma=self._sigma_voxels).to(self.device)
        self._place_smoothing()

    def set_map_settings(self, map_reference: str, smoothing_region: str) -> None:
        """Set ``map_reference`` and ``smoothing_region`` (see the class; ``"auto"`` is resolved), keeping the weights.

        Each is split between the graph and the scoring step: ``"peak"`` is computed in the graph and
        ``"brain_median"`` in the scoring step (the centring needs the brain mask); the smoothing goes to
        the scoring step over the brain only, or to the graph over the whole slab.

        Raises:
            ValueError: An unknown setting, or ``"peak"`` with ``"brain"`` (the peak map follows the smoothing).
        """
        check_choice("map_reference", map_reference, MAP_REFERENCES)
        if smoothing_region == AUTO:
            smoothing_region = "volume" if map_reference == "peak" else "brain"
        check_choice("smoothing_region", smoothing_region, SMOOTHING_REGIONS)
        if smoothing_region == "brain" and map_reference == "peak":
            msg = "map_reference='peak' smooths before its 1 - exp(l - max l), in the graph: set smoothing_region='volume'"
            raise ValueError(msg)
        peak = map_reference == "peak"
        self._model_arguments["map_reference"] = self.model.anomaly_map_generator.reference = "peak" if peak else "none"
        self.scoring = dataclasses.replace(self.scoring, map_reference="none" if peak else map_reference)
        self.hparams.update(map_reference=map_reference, smoothing_region=smoothing_region)
        self._place_smoothing()

    @property
    def _sigma_voxels(self) -> float:
        """``smoothing_sigma`` in voxels; until the training data resolve ``"auto"``, the paper's 1 mm value."""
        sigma = self._model_arguments["smoothing_sigma"]
        return PAPER_SIGMA_VOXELS if sigma == AUTO else float(sigma)

    def _place_smoothing(self) -> None:
        """Give the smoothing to the graph (whole slab) or to the scoring step (brain only), per ``smoothing_region``."""
        sigma = self._sigma_voxels
        # Independent 2-D images have no scoring step of this package: their smoothing stays in the graph.
        in_scoring = self.hparams["smoothing_region"] == "brain" and self._model_arguments["volumetric"]
        self.model.anomaly_map_generator.sigma = 0.0 if in_scoring else sigma
        self.scoring = dataclasses.replace(self.scoring, smoothing_sigma=sigma if in_scoring else 0.0)

    @property
    def model_backbone(self) -> str:
        """timm name of the slice encoder's backbone."""
        return self._model_arguments["backbone"]

    # ------------------------------------------------------------------------------- batch layout
    def _volume_rows(self, batch: Batch) -> list[tuple[int, slice]] | None:
        """Each volume's ``(index, rows)`` in the batch, or ``None`` when its rows are independent images."""
        if self.mode == "2d":
            return None
        has_volumes = getattr(batch, "volume_index", None) is not None
        if has_volumes:
            return batch.volumes()
        if self.mode == "3d":
            return [(0, slice(0, batch.image.shape[0]))]
        return None

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Extract the batch's features once, then take one flow step per ``features_per_step`` of them.

        Args:
            batch: Slices of whole healthy volumes (or independent images in 2-D mode).
            args: Unused.
            kwargs: Unused.

        Returns:
            The mean loss over the flow steps.
        """
        del args, kwargs
        volumes = self._volume_rows(batch)
        # Plain 2-D images carry no brain mask: every cell then trains the flow.
        brain = getattr(batch, "brain_mask", None) if self.train_cells == "brain" else None
        features, conditions = self.model.training_features(
            batch.image,
            None if volumes is None else [rows for _, rows in volumes],
            brain=brain,
        )
        mean_loss = fit_flow_on_features(
            self.model.flow,
            self.loss,
            features,
            conditions,
            self.optimizers(),
            features_per_step=self.features_per_step,
            noise_std=self.noise_std,
            backward=self.manual_backward,
            noise_scale=self.noise_scale,
        )
        self.log("train_loss", mean_loss, on_epoch=True, prog_bar=True, logger=True, batch_size=1)
        return {"loss": mean_loss}

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam on the flow only; the backbone is frozen."""
        parameters = [p for p in self.model.flow.parameters() if p.requires_grad]
        return optim.Adam(parameters, lr=self.learning_rate)

    # ---------------------------------------------------------------------------------- inference
    def _predict(self, batch: Batch) -> Batch:
        """Raw maps of every volume (depth cells never mix volumes), then the shared scoring step."""
        volumes = self._volume_rows(batch)
        if volumes is None:
            predictions = self.model.predict_images(batch.image)
            return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)
        anomaly_map = torch.cat([self.model.predict_volume(batch.image[rows]) for _, rows in volumes])
        return self.score_batch(batch.update(anomaly_map=anomaly_map, pred_score=slice_scores(anomaly_map)))

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    # ----------------------------------------------------------------------------- configuration
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """ImageNet normalisation only; slices already have the model grid's size.

        Args:
            image_size: Resize to this size first (for plain 2-D image datasets); ``None``: no resize.
        """
        return imagenet_pre_processor(image_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: thresholds and normalisation come from a full validation epoch."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on healthy volumes only."""
        return LearningType.ONE_CLASS
