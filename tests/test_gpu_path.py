"""The GPU path, checked on the CPU: every option gives the same map as the plain float32 eager model.

* separable smoothing and resizing (matrix products) against ``F.interpolate`` + a replicate-padded
  convolution, and against ``scipy.ndimage.gaussian_filter``;
* the scoring step without device waits against the reference per-volume loop with boolean indexing;
* the whole inference (model and scoring) captured as one graph with no break (what CUDA graphs and
  ``fullgraph`` compilation need: no branch on the data, no data-dependent shape);
* bf16 encoder, channels-last and ``torch.compile`` maps within stated tolerances of float32 eager;
* the flow and the map stay float32 inside an outer bf16 autocast region;
* the CPU deployment path: depth cells as one matrix product, the brain box from axis projections,
  and the deployed inferencer's map against the datamodule's slice stack through the same model.

Tolerances are relative to the largest absolute value of the reference map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.data.geometry import brain_bounding_box
from simpleslicenet.models.cuda_graphs import CapturedCall
from simpleslicenet.models.scoring import VolumeScoring, score_volumes, volume_score
from simpleslicenet.models.simpleslicenet.features import aggregate_depth
from simpleslicenet.models.simpleslicenet.lightning_model import fit_flow_on_features
from simpleslicenet.models.simpleslicenet.loss import create_loss
from simpleslicenet.models.simpleslicenet.settings import SimpleSliceNetSettings
from simpleslicenet.models.simpleslicenet.torch_model import SimpleSliceNetModel
from simpleslicenet.models.smoothing import (
    gaussian_blur_3d,
    gaussian_kernel_1d,
    linear_resize_matrix,
    resize_and_blur,
)

# bf16 keeps 8 significant bits: the encoder's features move the map by 1-2% (1.6% on this phantom
# volume on the reference CPU; 1.2% on a GPU at full size); 5% leaves room for other CPUs' bf16 kernels.
BF16_TOLERANCE = 5e-2
# Layout and compilation change only the order of float32 sums.
FP32_TOLERANCE = 1e-4

# The paper's map (1 - exp(l - max l), smoothed in the graph) with a short flow.
PAPER_TINY = SimpleSliceNetSettings(flow_blocks=4, smoothing_sigma=1.0, variant="paper")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]


def relative_difference(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest absolute value."""
    return float((result.float() - reference.float()).abs().max() / reference.float().abs().max())


def reference_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """The former implementation: three 1-channel conv3d passes over a replicate-padded ``[N, 1, D, H, W]``."""
    kernel = gaussian_kernel_1d(sigma, dtype=volume.dtype)
    radius = kernel.numel() // 2
    x = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x


@pytest.fixture(scope="module")
def phantom_slices(phantom_datamodule) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """ImageNet-normalised slices ``[16, 3, 32, 32]`` of a lesion phantom volume and its brain mask."""
    for index in range(len(phantom_datamodule.test_data)):
        item = phantom_datamodule.test_data[index]
        if bool(item.gt_mask.any()):
            return (item.image.float() - IMAGENET_MEAN) / IMAGENET_STD, item.brain_mask.bool()
    pytest.fail("the test phantom has no lesion volume")


@pytest.fixture(scope="module")
def fp32_model() -> SimpleSliceNetModel:
    """Default backbone (offline ImageNet weights), short flow, trained a few steps so the flow is not at its start."""
    torch.manual_seed(0)
    return SimpleSliceNetModel(PAPER_TINY)


def _trained(model: SimpleSliceNetModel, slices: torch.Tensor) -> SimpleSliceNetModel:
    model.train()
    optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-3)
    features, conditions = model.training_features(slices, [slice(0, slices.shape[0])])
    for _ in range(5):
        fit_flow_on_features(model.flow, create_loss("bgspp"), features, conditions, optimizer, features_per_step=512)
    return model.eval()


@pytest.fixture(scope="module")
def trained_state(fp32_model: SimpleSliceNetModel, phantom_slices) -> dict:  # noqa: ANN001
    """State dict of the briefly trained model (loaded into every variant)."""
    return _trained(fp32_model, phantom_slices[0]).state_dict()


def _variant(state: dict, precision: str = "fp32") -> SimpleSliceNetModel:
    torch.manual_seed(0)
    model = SimpleSliceNetModel(PAPER_TINY, precision=precision)
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------ separable operators
@pytest.mark.parametrize(("in_size", "out_size"), [(4, 16), (5, 17), (12, 12), (16, 6), (1, 7), (7, 1)])
def test_linear_resize_matrix_is_f_interpolate(in_size: int, out_size: int) -> None:
    identity = torch.eye(in_size)[None]  # interpolating each unit vector gives one column of the matrix
    expected = F.interpolate(identity, size=out_size, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(linear_resize_matrix(in_size, out_size), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 4.0])
def test_separable_blur_matches_convolution_and_scipy(sigma: float) -> None:
    volume = torch.rand(1, 1, 9, 30, 23)
    blurred = gaussian_blur_3d(volume, sigma)
    assert relative_difference(blurred, reference_blur(volume, sigma)) < 1e-6
    # scipy's "nearest" mode is replicate padding; its radius int(truncate·σ + 0.5) equals ours here.
    expected = ndimage.gaussian_filter(volume[0, 0].double().numpy(), sigma, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(blurred[0, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_resize_and_blur_is_interpolate_then_blur() -> None:
    grid = torch.randn(6, 5, 7)
    expected = reference_blur(F.interpolate(grid[None, None], size=(18, 40, 56), mode="trilinear", align_corners=False), 4.0)
    assert relative_difference(resize_and_blur(grid, (18, 40, 56), 4.0), expected[0, 0]) < 1e-5
    images = torch.randn(3, 5, 7)
    bilinear = F.interpolate(images[:, None], size=(40, 56), mode="bilinear", align_corners=False)[:, 0]
    assert relative_difference(resize_and_blur(images, (40, 56), 0.0), bilinear) < 1e-6


# ----------------------------------------------------------------------------------------- scoring
def reference_scores(anomaly_map: torch.Tensor, brain: torch.Tensor, rows: list[slice], scoring: VolumeScoring):  # noqa: ANN201
    """The loop the scoring step replaced: boolean indexing and a branch per volume."""
    maps, scores = anomaly_map.clone(), torch.empty(anomaly_map.shape[0])
    for part in rows:
        volume, mask = maps[part], brain[part]
        if scoring.map_reference == "brain_median":
            volume = volume - (volume[mask] if mask.any() else volume).median()
            maps[part] = volume
        if mask.any():
            volume = torch.where(mask, volume, volume[mask].min())
            maps[part] = volume
            values = volume[mask]
        else:
            values = volume
        scores[part] = volume_score(values, scoring)
    return maps, scores


@pytest.mark.parametrize(("mode", "reference"), [("max", "none"), ("topk_mean", "none"), ("max", "brain_median"), ("topk_mean", "brain_median")])
def test_scoring_without_device_waits_matches_the_reference_loop(mode: str, reference: str) -> None:
    torch.manual_seed(1)
    anomaly_map = torch.randn(20, 24, 24)
    brain = torch.rand(20, 24, 24) > 0.4
    brain[12:16] = False  # a volume without brain voxels keeps all of them
    rows = [slice(0, 12), slice(12, 16), slice(16, 20)]
    scoring = VolumeScoring(mode, 0.013, reference)
    scores = score_volumes(anomaly_map, brain, rows, scoring)
    maps, volume_scores = reference_scores(anomaly_map, brain, rows, scoring)
    torch.testing.assert_close(scores.anomaly_map, maps)
    torch.testing.assert_close(scores.volume_scores, volume_scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores.slice_scores, maps.flatten(1).amax(dim=1))


@pytest.mark.parametrize(("reference", "smoothing"), [("none", 0.0), ("brain_median", 0.0), ("brain_median", 2.0)])
def test_inference_and_scoring_capture_as_one_graph(fp32_model: SimpleSliceNetModel, phantom_slices, reference: str, smoothing: float) -> None:  # noqa: ANN001
    """No graph break: no branch on the data and no shape made from it (CUDA graphs and fullgraph compile need that)."""
    slices, brain = phantom_slices
    scoring = VolumeScoring("topk_mean", 0.01, reference, smoothing)

    def predict_and_score(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = score_volumes(fp32_model.predict_volume(images), mask, None, scoring)
        return scores.anomaly_map, scores.volume_scores

    with torch.no_grad():
        captured = torch.compile(predict_and_score, fullgraph=True, backend="eager")(slices, brain)
        eager = predict_and_score(slices, brain)
    for result, expected in zip(captured, eager, strict=True):
        torch.testing.assert_close(result, expected)


# ----------------------------------------------------------------------------------- GPU options
def test_bf16_encoder_map_is_within_tolerance(trained_state: dict, phantom_slices) -> None:  # noqa: ANN001
    slices, _ = phantom_slices
    reference, bf16 = _variant(trained_state), _variant(trained_state, precision="bf16")
    seen = []
    bf16.encoder.backbone.register_forward_hook(lambda _m, _i, output: seen.append(output[0].dtype))
    with torch.no_grad():
        expected = reference.predict_volume(slices)
        result = bf16.predict_volume(slices)
        features = bf16.encoder(slices)
    assert seen[0] == torch.bfloat16  # the backbone really ran in bf16
    assert features.dtype == result.dtype == torch.float32
    difference = relative_difference(result, expected)
    assert 0 < difference < BF16_TOLERANCE


def test_flow_and_map_stay_float32_under_outer_autocast(trained_state: dict, phantom_slices) -> None:  # noqa: ANN001
    slices, _ = phantom_slices
    model = _variant(trained_state)
    with torch.no_grad():
        features = model.encoder(slices)
        cells, conditions = model.volume_cells(features)
        expected = model.log_likelihood_grid(cells, conditions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pinned = model.log_likelihood_grid(cells, conditions)
            unpinned, _ = model.flow.couplings(model.to_rows(cells), conditions)
            score_map = model.anomaly_map_generator.volume_map(expected, (slices.shape[0], 32, 32))
        reference_map = model.anomaly_map_generator.volume_map(expected, (slices.shape[0], 32, 32))
    assert pinned.dtype == score_map.dtype == torch.float32
    torch.testing.assert_close(pinned, expected, rtol=0, atol=0)
    torch.testing.assert_close(score_map, reference_map, rtol=0, atol=0)
    assert unpinned.dtype == torch.bfloat16  # what the pin prevents: the couplings would run in bf16


def test_bf16_training_features_are_float32_and_train(trained_state: dict, phantom_slices) -> None:  # noqa: ANN001
    slices, _ = phantom_slices
    reference, bf16 = _variant(trained_state).train(), _variant(trained_state, precision="bf16").train()
    expected, _ = reference.training_features(slices, [slice(0, slices.shape[0])])
    features, conditions = bf16.training_features(slices, [slice(0, slices.shape[0])])
    assert features.dtype == conditions.dense().dtype == torch.float32
    assert relative_difference(features, expected) < BF16_TOLERANCE
    optimizer = torch.optim.Adam(bf16.flow.parameters(), lr=1e-3)
    loss = fit_flow_on_features(bf16.flow, create_loss("bgspp"), features, conditions, optimizer, features_per_step=512)
    assert torch.isfinite(loss)


def test_compiled_model_map_matches_eager(phantom_slices) -> None:  # noqa: ANN001
    """``compile_mode`` compiles the encoder and the flow in place; float32 maps agree to rounding."""
    slices, _ = phantom_slices
    torch.manual_seed(0)
    options = {"backbone": "resnet18", "backbone_weights": "random", "flow_blocks": 2, "smoothing_sigma": 1.0}
    eager = SimpleSliceNetModel(SimpleSliceNetSettings(**options)).eval()
    compiled = SimpleSliceNetModel(SimpleSliceNetSettings(**options, compile_mode="default")).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.encoder._compiled_call_impl is not None and compiled.flow._compiled_call_impl is not None
    with torch.no_grad():
        difference = relative_difference(compiled.predict_volume(slices), eager.predict_volume(slices))
    assert difference < FP32_TOLERANCE


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2), precision="fp16")


# ------------------------------------------------------------------------------------ CUDA graphs
def test_captured_call_needs_a_cuda_tensor() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors, got cpu"):
        CapturedCall(lambda x: x * 2, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_call_replays_the_eager_map(trained_state: dict, phantom_slices) -> None:  # noqa: ANN001
    slices = phantom_slices[0].cuda()
    model = _variant(trained_state).cuda()
    captured = CapturedCall(model.predict_volume, slices)
    with torch.no_grad():
        expected = model.predict_volume(slices)
    assert relative_difference(captured(slices).clone(), expected) < FP32_TOLERANCE
    with pytest.raises(ValueError, match="captured for"):
        captured(slices[:-1])


# ------------------------------------------------------------------------------- CPU deployment path
def reference_depth_cells(features: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """The former depth aggregation: zero padding, 3-D average pooling, division by the real slice count."""
    depth = features.shape[0]
    cells = (depth + stride - 1) // stride
    pad = (0, 0, 0, 0, (window - 1) // 2 - (stride - 1) // 2, window + stride)
    sums = F.avg_pool3d(F.pad(features.permute(1, 0, 2, 3)[None], pad), (window, 1, 1), (stride, 1, 1))
    counts = F.avg_pool3d(F.pad(features.new_ones(1, 1, depth, 1, 1), pad), (window, 1, 1), (stride, 1, 1))
    return (sums[:, :, :cells] / counts[:, :, :cells])[0].permute(1, 0, 2, 3)


@pytest.mark.parametrize("depth", [1, 2, 16, 17, 96])
@pytest.mark.parametrize(("window", "stride"), [(3, 3), (3, 1), (5, 2), (4, 4), (2, 1)])
def test_depth_cells_as_a_matrix_product_match_pooling(depth: int, window: int, stride: int) -> None:
    features = torch.randn(depth, 6, 3, 4)
    torch.testing.assert_close(
        aggregate_depth(features, window, stride), reference_depth_cells(features, window, stride), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("fraction", [0.0, 0.002, 0.4, 1.0])
def test_brain_box_from_projections_matches_voxel_coordinates(fraction: float) -> None:
    mask = np.random.default_rng(3).random((23, 17, 11)) < fraction
    coordinates = np.argwhere(mask)
    expected = (
        (coordinates.min(axis=0), coordinates.max(axis=0) + 1) if coordinates.size else (np.zeros(3), np.array(mask.shape))
    )
    for result, reference in zip(brain_bounding_box(mask), expected, strict=True):
        np.testing.assert_array_equal(result, reference)

