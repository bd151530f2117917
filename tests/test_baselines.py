"""Baselines on tiny volumes: slice-wise anomalib models, the 3D autoencoder, and the model registry.

Volumes are 32×32×16 (a batch of 16 slices of 32×32), written as NIfTI once per module, so the whole
file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.engine import Engine
from anomalib.models import Dfkde, Patchcore
from anomalib.models.components import AnomalibModule
from torchvision.transforms.v2.functional import normalize

from simpleslicenet.data.batch import VolumeBatch
from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.dataset import volume_to_batch
from simpleslicenet.models import registry
from simpleslicenet.models.ae3d import AE3D, AutoEncoder3dModel
from simpleslicenet.models.ae3d.torch_model import masked_reconstruction_loss
from simpleslicenet.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from simpleslicenet.models.slicewise import (
    CflowSlices,
    FastflowSlices,
    PatchcoreSlices,
    SliceWiseMixin,
    slicewise,
)
from simpleslicenet.models.scoring import VolumeScoring, volume_score

SHAPE = (32, 32, 16)  # (x, y, z): model batches are [16, 3, 32, 32]
DEPTH, HEIGHT, WIDTH = SHAPE[2], SHAPE[1], SHAPE[0]


def volume_maps(batch: VolumeBatch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(volume_index, anomaly_map [D, H, W], volume_score)`` of each volume of a predicted batch."""
    maps = batch.anomaly_map[:, 0] if batch.anomaly_map.dim() == 4 else batch.anomaly_map
    return [(index, maps[rows], batch.volume_score[rows.start]) for index, rows in batch.volumes()]


def _phantom(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' with smooth texture and noise; a lesion is a bright sphere inside it."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.95) ** 2 < 1
    phase = rng.uniform(0, 0.3)
    texture = 0.5 + 0.2 * np.sin(6 * x + phase) * np.cos(5 * y) + 0.03 * rng.standard_normal(SHAPE)
    image = np.where(brain, texture, 0).astype(np.float32)
    lesion_mask = np.zeros(SHAPE, dtype=np.uint8)
    if lesion:
        centre = rng.uniform(-0.3, 0.3, 3)
        sphere = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < 0.3**2
        image[sphere] = 1.0
        lesion_mask[sphere] = 1
    return image, lesion_mask, brain.astype(np.uint8)


@pytest.fixture(scope="module")
def datamodule(phantom_datamodule: VolumeDataModule) -> VolumeDataModule:
    """The shared tiny phantom (tests/conftest.py): 32×32×16 grid, healthy training volumes."""
    return phantom_datamodule


def _engine(root: Path, max_epochs: int = 1) -> Engine:
    return Engine(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _fit(engine: Engine, model: AnomalibModule, datamodule: VolumeDataModule) -> None:
    """Fit on the set-up datamodule's loaders (handing over the datamodule would set it up again)."""
    engine.fit(
        model=model,
        train_dataloaders=datamodule.train_dataloader(),
        val_dataloaders=datamodule.val_dataloader(),
    )


def _check_volume_predictions(predictions: list, n_volumes: int) -> None:
    """One batch a volume: 3D map [D, H, W], one slice score per slice, one volume score per volume."""
    assert len(predictions) == n_volumes
    seen = set()
    for batch in predictions:
        assert isinstance(batch, VolumeBatch)
        [(index, anomaly_map, score)] = volume_maps(batch)
        seen.add(index)
        assert anomaly_map.shape == (DEPTH, HEIGHT, WIDTH)
        assert torch.isfinite(anomaly_map).all()
        assert batch.pred_score.shape == (DEPTH,)
        assert batch.volume_score.shape == (DEPTH,)
        assert torch.all(batch.volume_score == score)
        assert torch.isfinite(score)
    assert len(seen) == n_volumes


@pytest.fixture(scope="module")
def fitted_patchcore(datamodule: VolumeDataModule, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model = PatchcoreSlices(backbone_weights="random", coreset_sampling_ratio=0.25, train_slice_stride=2)
    engine = _engine(tmp_path_factory.mktemp("patchcore"))
    _fit(engine, model, datamodule)
    return model, engine


def test_training_slices_selection() -> None:
    """Training keeps brain slices on the stride grid only."""
    rng = np.random.default_rng(1)
    image, _, brain = _phantom(rng, lesion=False)
    brain[..., :3] = 0  # the three lowest slices hold no brain
    batch = volume_to_batch(image, brain_mask=brain)
    model = PatchcoreSlices(backbone_weights="random", train_slice_stride=3)
    selected = model.training_slices(batch)
    expected = [i for i in range(DEPTH) if i % 3 == 0 and brain[..., i].any()]
    assert 0 not in expected
    assert selected.slice_index.tolist() == expected
    assert torch.equal(selected.image, batch.image[expected])
    assert torch.equal(selected.brain_mask, batch.brain_mask[expected])
    model.brain_slices_only = False
    assert model.training_slices(batch).slice_index.tolist() == list(range(0, DEPTH, 3))


def test_patchcore_slices_fit_test_predict(fitted_patchcore: tuple, datamodule: VolumeDataModule) -> None:
    model, engine = fitted_patchcore
    # Memory bank: 25% of the locations of every second brain slice of the training volumes.
    locations = (HEIGHT // 8) * (WIDTH // 8)
    train_slices = 0
    for index in range(len(datamodule.train_data)):
        volume = datamodule.train_data[index]
        train_slices += int((volume.brain_mask.flatten(1).any(1) & (volume.slice_index % 2 == 0)).sum())
    assert model.model.memory_bank.shape == (int(train_slices * locations * 0.25), 40 + 112)
    results = engine.test(model=model, dataloaders=datamodule.test_dataloader())
    assert {"voxel_AUROC", "voxel_AUPRC", "slice_AUROC", "volume_AUROC"} <= set(results[0])
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    _check_volume_predictions(predictions, n_volumes=len(datamodule.test_data))


def test_slicewise_map_equals_plain_model_per_slice(fitted_patchcore: tuple, datamodule: VolumeDataModule) -> None:
    """The 3D map is the wrapped model's slice maps stacked; the volume score is their brain maximum."""
    model, engine = fitted_patchcore
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    plain = Patchcore(backbone=model.hparams.backbone, layers=model.hparams.layers, pre_trained=False)
    plain.model.memory_bank = model.model.memory_bank.clone()
    plain.model.load_state_dict(model.model.state_dict())
    plain.model.eval()
    positions = {int(v): i for i, v in enumerate(datamodule.test_data.samples.volume_index)}
    for batch in predictions:
        [(index, anomaly_map, score)] = volume_maps(batch)
        volume = datamodule.test_data[positions[index]]
        raw_maps = []
        for row in range(DEPTH):  # one slice at a time: nothing may leak between slices
            image = normalize(volume.image[row : row + 1].float(), list(IMAGENET_MEAN), list(IMAGENET_STD))
            prediction = plain.model(image)
            raw_maps.append(prediction.anomaly_map[0, 0])
        raw_map = torch.stack(raw_maps)
        brain = volume.brain_mask
        # Inside the brain the map is the plain model's; outside it sits at the volume's brain minimum,
        # and each slice's score is its brain maximum.
        restricted = torch.where(brain, raw_map, raw_map[brain].min())
        restricted_scores = restricted.flatten(1).amax(1)
        # Predictions are normalised by the model's fitted post-processor; apply the same to the plain maps.
        expected = model.post_processor(InferenceBatch(pred_score=restricted_scores, anomaly_map=restricted))
        torch.testing.assert_close(anomaly_map, expected.anomaly_map, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.pred_score, expected.pred_score, rtol=1e-4, atol=1e-5)
        # The volume score stays in the model's raw units (normalisation clamps, which would create ties).
        torch.testing.assert_close(score, raw_map[brain].max(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(score, volume_score(raw_map[brain], VolumeScoring()), rtol=1e-4, atol=1e-5)


def test_patchcore_slices_checkpoint_round_trip(fitted_patchcore: tuple) -> None:
    model, engine = fitted_patchcore
    path = Path(engine.trainer.default_root_dir) / "round_trip.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = PatchcoreSlices.load_from_checkpoint(path)
    assert type(restored) is PatchcoreSlices
    assert restored.train_slice_stride == 2
    assert restored.backbone_weights == "random"
    assert torch.equal(restored.model.memory_bank, model.model.memory_bank)


def test_cflow_slices_fit_test_predict(datamodule: VolumeDataModule, tmp_path: Path) -> None:
    model = CflowSlices(backbone_weights="random", fiber_batch_size=16, coupling_blocks=2, condition_vector=16)
    engine = _engine(tmp_path)
    _fit(engine, model, datamodule)
    engine.test(model=model, dataloaders=datamodule.test_dataloader())
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    _check_volume_predictions(predictions, n_volumes=len(datamodule.test_data))
    # A slice's map must not depend on the other slices of the batch (anomalib's CFLOW map does).
    model.model.eval()
    image = normalize(datamodule.test_data[0].image.float(), list(IMAGENET_MEAN), list(IMAGENET_STD))
    whole = model.model(image).anomaly_map
    for rows in (slice(0, DEPTH // 2), slice(DEPTH // 2, DEPTH)):
        torch.testing.assert_close(whole[rows], model.model(image[rows]).anomaly_map, rtol=1e-4, atol=1e-4)
    assert whole.std() > 0


def test_offline_imagenet_weights_are_loaded() -> None:
    from simpleslicenet.models.backbones import load_imagenet_state_dict

    model = PatchcoreSlices()
    assert model.hparams.backbone_weights == "imagenet"
    reference = load_imagenet_state_dict("tf_efficientnet_lite0")
    extractor = model.model.feature_extractor.feature_extractor.state_dict()
    for key in ("conv_stem.weight", "blocks.2.0.conv_pw.weight", "blocks.4.0.bn3.running_var"):
        assert torch.equal(extractor[key], reference[key])
    random_model = PatchcoreSlices(backbone_weights="random")
    assert not torch.equal(random_model.model.feature_extractor.feature_extractor.state_dict()["conv_stem.weight"], reference["conv_stem.weight"])


def test_slicewise_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="train_slice_stride"):
        PatchcoreSlices(backbone_weights="random", train_slice_stride=0)
    with pytest.raises(ValueError, match="backbone_weights"):
        PatchcoreSlices(backbone_weights="imagenet21k")
    with pytest.raises(ValueError, match="no offline ImageNet weights"):
        PatchcoreSlices(backbone="resnet18", layers=["layer2", "layer3"])
    with pytest.raises(ValueError, match="image_size"):
        FastflowSlices(backbone_weights="random")
    with pytest.raises(TypeError):
        slicewise(torch.nn.Linear)


def test_slicewise_factory_classes_pickle_and_resolve() -> None:
    dfkde_slices = slicewise(Dfkde)
    assert dfkde_slices is slicewise(Dfkde)
    assert issubclass(dfkde_slices, Dfkde) and issubclass(dfkde_slices, SliceWiseMixin)
    assert dfkde_slices.__name__ == "DfkdeSlices"
    assert pickle.loads(pickle.dumps(dfkde_slices)) is dfkde_slices
    assert slicewise(Patchcore) is PatchcoreSlices
    import simpleslicenet.models.slicewise as module

    assert module.StfpmSlices.__name__ == "StfpmSlices"


def test_ae3d_pads_and_crops_any_grid() -> None:
    torch.manual_seed(0)
    network = AutoEncoder3dModel(widths=(4, 8, 8, 8), latent_channels=4, sigma=1.0)
    volume = torch.rand(2, 1, 13, 30, 27)
    assert network.reconstruct(volume).shape == volume.shape
    network.eval()
    slices = torch.rand(13, 3, 30, 27)
    prediction = network(slices)
    assert prediction.anomaly_map.shape == (13, 30, 27)
    assert prediction.pred_score.shape == (13,)
    assert prediction.anomaly_map.min() > 0  # a residual map: the shared scoring step restricts it to the brain
    torch.testing.assert_close(prediction.pred_score, prediction.anomaly_map.flatten(1).amax(1))


def _training_error(model: AE3D, datamodule: VolumeDataModule) -> float:
    """Mean brain-masked L1 error of the model on the training volumes."""
    model.eval()
    errors = []
    with torch.no_grad():
        for index in range(len(datamodule.train_data)):
            batch = datamodule.train_data[index]
            volume = AutoEncoder3dModel.fold(batch.image)
            reconstruction = model.model.reconstruct(volume)
            errors.append(masked_reconstruction_loss(volume, reconstruction, batch.brain_mask[None, None]).item())
    return float(np.mean(errors))


def test_ae3d_learns_and_predicts_volumes(datamodule: VolumeDataModule, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AE3D(widths=(8, 16, 32, 32), latent_channels=8, sigma=1.0)
    before = _training_error(model, datamodule)
    engine = _engine(tmp_path, max_epochs=8)
    _fit(engine, model, datamodule)
    after = _training_error(model, datamodule)
    assert after < 0.6 * before, (before, after)
    engine.test(model=model, dataloaders=datamodule.test_dataloader())
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    _check_volume_predictions(predictions, n_volumes=len(datamodule.test_data))
    for batch in predictions:
        [(_, anomaly_map, _)] = volume_maps(batch)
        assert torch.all(anomaly_map[~batch.brain_mask] == anomaly_map.min())  # nothing outside the brain


def test_ae3d_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loss"):
        AE3D(loss="huber")
    with pytest.raises(ValueError, match="norm"):
        AE3D(norm="group")


def test_every_registered_model_resolves() -> None:
    for name in registry.list_models():
        cls = registry.get_model_class(name)
        assert isinstance(cls, type) and issubclass(cls, AnomalibModule), name
        assert cls.__name__ == name
        spec = registry.get_spec(name)
        config = registry.config_path(name)
        assert config.is_file(), config
        assert spec.class_path in config.read_text(), config


def test_registry_resolves_anomalib_names() -> None:
    assert registry.get_model_class("Patchcore") is PatchcoreSlices
    assert registry.get_model_class("patchcore_slices") is PatchcoreSlices
    assert registry.get_model_class("Dfkde") is slicewise(Dfkde)
    assert registry.get_model_class("DfkdeSlices") is slicewise(Dfkde)
    assert registry.get_model_class("simpleslicenet.models.ae3d.AE3D") is AE3D
    with pytest.raises(registry.UnknownModelError, match="unknown model"):
        registry.get_model_class("NoSuchModel")
    model = registry.create_model("Fastflow", image_size=(64, 64))
    assert type(model).__name__ == "FastflowSlices"
    assert model.backbone_weights == "random"  # its packaged configuration's: ResNets have no offline weights
    # Not in the table, still reachable by name: anomalib's image models come wrapped for volumes.
    assert registry.get_spec("ReverseDistillation") is None
    assert registry.get_model_class("ReverseDistillation").__name__ == "ReverseDistillationSlices"
