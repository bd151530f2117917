"""EDC fine-tuning of the slice encoder: data, training, resume, and loading the result into the models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

SETTINGS = {"steps": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):
    """A set-up tiny phantom: 3 healthy (2 train) + 1 lesion subject, 4 mm, 32×32×16 grid."""
    from simpleslicenet.data.datamodules import BrainPhantom

    datamodule = BrainPhantom(
        n_healthy=3, n_lesion=1, spacing_mm=4.0, target_shape=(32, 32, 16),
        root=tmp_path_factory.mktemp("edc_phantom"), progress=False,
    )
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def slices(phantom):
    from simpleslicenet.training.data import slices_from_datamodule

    return slices_from_datamodule(phantom)


@pytest.fixture(scope="module")
def edc_run(slices, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 4-step EDC run on the phantom slices."""
    from simpleslicenet.training import EDCSettings, train_edc

    out = tmp_path_factory.mktemp("edc") / "encoder.pth"
    return train_edc(slices, out, EDCSettings(**SETTINGS), device="cpu", progress=False, drift_every=2)


def test_slices_are_brain_slices_of_training_volumes_normalised_like_the_models(phantom, slices) -> None:
    from simpleslicenet.models.backbones import imagenet_pre_processor

    volumes = [phantom.train_data[i] for i in range(len(phantom.train_data))]
    assert len(volumes) == 2 and len(slices) == sum(int(v.brain_mask.flatten(1).any(dim=1).sum()) for v in volumes)
    assert slices.images.shape[1:] == (1, 32, 32)  # grey, repeated to RGB per batch

    first = volumes[0].image[volumes[0].brain_mask.flatten(1).any(dim=1)]
    expected = imagenet_pre_processor().transform(first[:3].float())
    assert torch.equal(slices.batch(torch.arange(3)), expected)


def test_slices_without_brain_are_left_out() -> None:
    from types import SimpleNamespace

    from simpleslicenet.training.data import slices_from_datamodule

    brain = torch.zeros(6, 8, 8, dtype=torch.bool)
    brain[2:4, 3:5, 3:5] = True
    volume = SimpleNamespace(image=torch.rand(6, 1, 8, 8).expand(-1, 3, -1, -1), brain_mask=brain)
    datamodule = SimpleNamespace(train_data=[volume])
    slices = slices_from_datamodule(datamodule)
    assert torch.equal(slices.images, volume.image[2:4, :1])


def test_batches_depend_only_on_seed_and_step() -> None:
    from simpleslicenet.training.data import batch_indices

    first = [batch_indices(10, 4, step, seed=0) for step in range(5)]
    assert all(torch.equal(a, batch_indices(10, 4, step, seed=0)) for step, a in enumerate(first))
    # Every epoch (10 items, batches of 4: the stream of the first 20) covers each item once.
    stream = torch.cat(first)[:20]
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])
    assert not torch.equal(first[0], batch_indices(10, 4, 0, seed=1))


def test_weights_file_is_a_strict_timm_state_dict(edc_run) -> None:
    import timm

    from simpleslicenet.models.backbones import load_imagenet_state_dict, load_weights_file
    from simpleslicenet.training import check_encoder_weights

    raw = torch.load(edc_run.weights, weights_only=True)
    assert isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values())
    state = load_weights_file(edc_run.weights)
    result = timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert check_encoder_weights(edc_run.weights, "tf_efficientnet_lite0") == 296

    imagenet = load_imagenet_state_dict("tf_efficientnet_lite0")
    changed = [k for k in imagenet if not torch.equal(imagenet[k], state[k])]
    assert any(k.startswith("blocks.1.") and k.endswith("weight") for k in changed)  # trained, not copied
    assert torch.equal(imagenet["classifier.weight"], state["classifier.weight"])  # unused head kept as it was

    for path in (edc_run.checkpoint, edc_run.loss_curve, edc_run.summary):
        assert path.is_file() and path.parent == edc_run.weights.parent
    assert edc_run.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(edc_run.history["loss"]) == SETTINGS["steps"] and edc_run.history["drift_step"] == [2, 4]


def _features(extractor: torch.nn.Module, images: torch.Tensor):
    with torch.no_grad():
        maps = extractor(images)
    return {k: v.clone() for k, v in maps.items()} if isinstance(maps, dict) else [m.clone() for m in maps]


def test_simpleslicenet_and_patchcore_load_the_tuned_encoder(edc_run, slices) -> None:
    from simpleslicenet.models.backbones import load_weights_file
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    from simpleslicenet.models.slicewise import PatchcoreSlices

    tuned_state = load_weights_file(edc_run.weights)
    images = slices.batch(torch.arange(4))
    layers = ["blocks.1", "blocks.2"]

    tuned = SimpleSliceNet(layers=layers, backbone_weights=str(edc_run.weights)).model.encoder.backbone
    plain = SimpleSliceNet(layers=layers).model.encoder.backbone
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, tuned_state[key])
    for a, b in zip(_features(tuned, images), _features(plain, images), strict=True):
        assert a.shape == b.shape and (a - b).abs().max() > 1e-4

    tuned_pc = PatchcoreSlices(backbone_weights=edc_run.weights).model.feature_extractor
    plain_pc = PatchcoreSlices().model.feature_extractor
    for key, value in tuned_pc.feature_extractor.state_dict().items():
        assert torch.equal(value, tuned_state[key])
    tuned_maps, plain_maps = _features(tuned_pc, images), _features(plain_pc, images)
    assert list(tuned_maps) == list(plain_maps) == ["blocks.2", "blocks.4"]
    assert all((tuned_maps[k] - plain_maps[k]).abs().max() > 1e-4 for k in tuned_maps)

    with pytest.raises(ValueError, match="weights file"):
        PatchcoreSlices(backbone_weights=str(edc_run.weights.with_name("missing.pth")))


def test_loss_decreases_on_a_fixed_batch(slices, tmp_path: Path) -> None:
    from simpleslicenet.training import EDCSettings, NormalSlices, train_edc

    fixed = NormalSlices(slices.images[:4], source="four slices")  # batch 4 of 4 slices: always the same batch
    result = train_edc(fixed, tmp_path / "enc.pth", EDCSettings(steps=8, batch_size=4), device="cpu", progress=False)
    losses = result.history["loss"]
    assert losses[-1] < losses[0] - 0.05
    assert sum(losses[-3:]) < sum(losses[:3])


def test_anchor_term_starts_at_zero_and_grows(slices, tmp_path: Path) -> None:
    from simpleslicenet.training import EDCSettings, NormalSlices, train_edc

    fixed = NormalSlices(slices.images[:4], source="four slices")
    settings = EDCSettings(steps=3, batch_size=4, anchor_weight=1.0, lr_encoder=1e-3)
    anchor = train_edc(fixed, tmp_path / "enc.pth", settings, device="cpu", progress=False).history["anchor"]
    assert anchor[0] < 1e-5 < anchor[-1]  # the frozen copy equals the encoder only before the first update


def test_interrupted_run_resumes_to_the_same_weights(edc_run, slices, tmp_path: Path) -> None:
    from simpleslicenet.models.backbones import load_weights_file
    from simpleslicenet.training import EDCSettings, train_edc

    out = tmp_path / "encoder.safetensors"

    def interrupt(step: int, _loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_edc(slices, out, EDCSettings(**SETTINGS), checkpoint_every=2, device="cpu", progress=False, on_step=interrupt)
    assert not out.exists()  # only a finished run writes the weights

    resumed = train_edc(slices, out, EDCSettings(**SETTINGS), checkpoint_every=2, device="cpu", progress=False)
    assert resumed.resumed_from == 2
    assert resumed.history["loss"] == edc_run.history["loss"]
    expected, got = load_weights_file(edc_run.weights), load_weights_file(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    # The checkpoint is Lightning's, readable without running code; asking for more steps extends the run.
    saved = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == SETTINGS["steps"] and saved["edc"]["history"]["loss"] == resumed.history["loss"]
    longer = train_edc(slices, out, EDCSettings(**{**SETTINGS, "steps": 6}), checkpoint_every=2, device="cpu", progress=False)
    assert longer.resumed_from == 4 and len(longer.history["loss"]) == 6
    assert longer.history["loss"][:4] == edc_run.history["loss"]


def test_resume_refuses_a_checkpoint_of_other_settings(edc_run, slices) -> None:
    from simpleslicenet.training import EDCResumeError, EDCSettings, train_edc

    other = EDCSettings(**{**SETTINGS, "lr_encoder": 1e-4})
    with pytest.raises(EDCResumeError, match="lr_encoder"):
        train_edc(slices, edc_run.weights, other, device="cpu", progress=False)


def test_settings_validation() -> None:
    from simpleslicenet.training import EDCNetwork, EDCSettings
    from simpleslicenet.training.edc import initial_encoder_state

    with pytest.raises(ValueError, match="pretrained"):
        EDCSettings(backbone_weights="random")
    with pytest.raises(ValueError, match="positive"):
        EDCSettings(steps=0)
    settings = EDCSettings(stages=(2, 4))  # 4 is the bottleneck itself
    with pytest.raises(ValueError, match="shallower than the bottleneck"):
        EDCNetwork(settings, initial_encoder_state(settings.backbone, "imagenet"))


def test_cli_defaults_are_edc_settings_and_cli_trains_on_an_image_folder(slices, tmp_path: Path) -> None:
    from PIL import Image

    from simpleslicenet.cli import main
    from simpleslicenet.training import EDCSettings, check_encoder_weights
    from simpleslicenet.training.command import DEFAULTS

    assert DEFAULTS == {f.name: f.default for f in dataclasses.fields(EDCSettings)}

    folder = tmp_path / "slices"
    folder.mkdir()
    for index in range(3):
        grey = (slices.images[index, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(grey).resize((40, 40)).save(folder / f"slice_{index}.png")
    out = tmp_path / "cli" / "encoder.pth"
    argv = ["edc", "--data", str(folder), "--image-size", "32", "32", "--out", str(out), "--steps", "2", "--batch-size", "2"]
    main([*argv, "--device", "cpu", "--no-progress"])
    assert check_encoder_weights(out, "tf_efficientnet_lite0") == 296
    assert (out.parent / "encoder_loss.png").is_file()


def test_br35h_folder_gives_its_training_split_of_normal_images(tmp_path: Path) -> None:
    from PIL import Image

    from simpleslicenet.training.data import load_normal_slices

    for folder, count, value in (("no", 5, 60), ("yes", 2, 200)):
        (tmp_path / folder).mkdir()
        for index in range(count):
            Image.new("L", (40, 48), color=value + index).convert("RGB").save(tmp_path / folder / f"{index}.png")
    slices = load_normal_slices(tmp_path, image_size=(32, 32))
    assert slices.images.shape == (4, 1, 32, 32)  # one of the five healthy images is held out for testing
    assert float(slices.images.max()) < 100 / 255  # no tumour image among them
