"""Units of SimpleSliceNet: features, depth mean, flow, losses, anomaly map, torch and Lightning model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.models.simpleslicenet import SimpleSliceNet, SimpleSliceNetModel
from simpleslicenet.models.simpleslicenet.anomaly_map import AnomalyMapGenerator, likelihood_to_score
from simpleslicenet.models.simpleslicenet.features import (
    FeatureStandardizer,
    SliceFeatureExtractor,
    aggregate_depth,
    brain_cell_share,
    channel_pool,
    depth_cell_centres,
    pool_neighbourhood,
    positional_encoding_1d,
    positional_encoding_2d,
)
from simpleslicenet.models.simpleslicenet.conditions import PositionCodes
from simpleslicenet.models.simpleslicenet.flow import ConditionalFlow, log_likelihood
from simpleslicenet.models.simpleslicenet.settings import SimpleSliceNetSettings
from simpleslicenet.models.simpleslicenet.loss import (
    BoundaryGuidedSemiPushPullLoss,
    TripletLikelihoodLoss,
    abnormal_focal_weights,
    add_feature_noise,
    normal_boundary,
    normal_focal_weights,
)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny_model() -> SimpleSliceNetModel:
    torch.manual_seed(0)
    return SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2, smoothing_sigma=1.0, variant="paper")).eval()


@pytest.fixture(scope="session")
def volume() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=generator)


# ------------------------------------------------------------------------------------------ features
def unfolded_embedding(maps: list[torch.Tensor], layer_dim: int, out_dim: int) -> torch.Tensor:
    """The original formulation: unfold 3×3 patches, upsample, 1-D adaptive pooling per layer and fused."""
    reference_size = maps[0].shape[-2:]
    per_layer = []
    for feature_map in maps:
        batch, channels, height, width = feature_map.shape
        patches = F.unfold(feature_map, kernel_size=3, padding=1).view(batch, channels * 9, height, width)
        if (height, width) != reference_size:
            patches = F.interpolate(patches, size=reference_size, mode="bilinear", align_corners=False)
        rows = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * 9)
        per_layer.append(F.adaptive_avg_pool1d(rows, layer_dim))
    fused = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), out_dim)
    batch = maps[0].shape[0]
    return fused.view(batch, *reference_size, out_dim).permute(0, 3, 1, 2)


def test_pooled_features_equal_the_unfolded_original() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 48, 8, 8, generator=generator), torch.randn(2, 96, 4, 4, generator=generator)]
    pooled = SliceFeatureExtractor(torch.nn.Identity(), [48, 96], embed_dim=16).embed(maps)
    assert pooled.shape == (2, 16, 8, 8)
    torch.testing.assert_close(pooled, unfolded_embedding(maps, 16, 16), rtol=0, atol=1e-5)


def test_pooled_features_equal_unfolded_on_the_real_backbone(tiny_model, volume) -> None:
    backbone = tiny_model.encoder.backbone
    maps = backbone(volume[:4])
    pooled = SliceFeatureExtractor(backbone, [40, 112], embed_dim=8).embed(maps)
    torch.testing.assert_close(pooled, unfolded_embedding(maps, 8, 8), rtol=0, atol=1e-5)


def test_neighbourhood_one_keeps_every_cell_and_reaches_the_encoder() -> None:
    features = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(pool_neighbourhood(features, 1), features, rtol=0, atol=0)
    assert not torch.allclose(pool_neighbourhood(features, 3), features)
    model = SimpleSliceNet(neighbourhood=1, flow_blocks=2)
    assert model.model.encoder.neighbourhood == 1
    assert model.hparams["neighbourhood"] == 1
    assert SimpleSliceNet(flow_blocks=2).model.encoder.neighbourhood == 3


def test_slice_padding_makes_the_slice_continue_as_background(tiny_model) -> None:
    # A bright "brain" that nearly touches the slice's top edge, and one the grid cuts there (its tissue
    # reaches the border: the margin stays dark instead of smearing it outwards), on a dark background.
    slices = torch.full((2, 3, 32, 32), -2.0)
    slices[0, :, 2:20, 6:26] = 1.0
    slices[1, :, 0:20, 6:26] = 1.0
    backbone, channels = tiny_model.encoder.backbone, tiny_model.encoder.layer_channels
    padded = SliceFeatureExtractor(backbone, channels, embed_dim=8, padding=16, stride=8)
    bare = SliceFeatureExtractor(backbone, channels, embed_dim=8)
    # The padded encoder sees the slice as if it lay in a larger background canvas: the backbone's zero
    # padding (a false edge) no longer reaches the brain.
    canvas = torch.full((2, 3, 64, 64), -2.0)
    canvas[:, :, 16:48, 16:48] = slices
    embedding = padded(slices)
    assert embedding.shape == bare(slices).shape == (2, 8, 4, 4)
    torch.testing.assert_close(embedding, bare(canvas)[..., 2:6, 2:6], rtol=0, atol=1e-5)
    assert (embedding - bare(slices)).abs().amax() > 0.1
    with pytest.raises(ValueError, match="multiple of the feature stride 8"):
        SliceFeatureExtractor(backbone, channels, padding=4, stride=8)


def test_slice_padding_follows_the_stages_and_a_checkpoint_brings_its_own() -> None:
    stock = SimpleSliceNet(flow_blocks=1, backbone_weights="random")
    assert stock.model.encoder.padding == 16  # stride-8/16 stages: one cell of the coarser
    quick = SimpleSliceNet(flow_blocks=1, backbone_weights="random", layers=["blocks.1", "blocks.2"])
    assert (quick.model.encoder.padding, quick.model.encoder.stride) == (8, 4)
    # Stages resolved from the data bring their own padding, recorded as the number it became.
    stock.use_settings(SimpleSliceNetSettings(flow_blocks=1, backbone_weights="random", layers=["blocks.1", "blocks.2"]))
    assert stock.model.encoder.padding == 8 and stock.hparams["slice_padding"] == 8 == stock.settings.slice_padding
    # A checkpoint's settings replace this instance's, whatever it was built with.
    stored = {**quick.hparams, "slice_padding": 16, "pre_processor": True}
    quick.on_load_checkpoint({"hyper_parameters": stored, "simpleslicenet": quick.metadata()})
    assert quick.model.encoder.padding == 16 and quick.settings.slice_padding == 16
    with pytest.raises(ValueError, match="slice_padding"):
        SimpleSliceNet(slice_padding=-8)


def test_channel_pool_matches_adaptive_pooling_for_any_size() -> None:
    features = torch.randn(2, 40, 3, 5)
    for out_channels in (8, 7, 40, 64):
        expected = F.adaptive_avg_pool1d(features.permute(0, 2, 3, 1).reshape(-1, 1, 40), out_channels)
        expected = expected.view(2, 3, 5, out_channels).permute(0, 3, 1, 2)
        torch.testing.assert_close(channel_pool(features, out_channels), expected, rtol=0, atol=1e-6)


def test_native_channels_are_concatenated_without_embed_dim() -> None:
    maps = [torch.randn(1, 4, 6, 6), torch.randn(1, 6, 3, 3)]
    fused = SliceFeatureExtractor(torch.nn.Identity(), [4, 6], embed_dim=None).embed(maps)
    assert fused.shape == (1, 10, 6, 6)
    torch.testing.assert_close(fused[:, :4], F.avg_pool2d(maps[0], 3, 1, 1, count_include_pad=True))


def test_positional_encoding_2d_varies_along_both_axes() -> None:
    code = positional_encoding_2d(16, 5, 7)
    assert code.shape == (16, 5, 7)
    assert torch.equal(code[:8, 0], code[:8, 4])  # the column half ignores the row
    assert torch.equal(code[8:, :, 0], code[8:, :, 6])  # the row half ignores the column
    assert not torch.equal(code[:, 1, 2], code[:, 2, 1])


# ------------------------------------------------------------------------------------ depth average
def test_aggregate_depth_stride_3_means_disjoint_triplets() -> None:
    features = torch.randn(16, 4, 2, 3)
    cells = aggregate_depth(features, window=3, stride=3)
    assert cells.shape == (6, 4, 2, 3)
    for cell in range(5):
        torch.testing.assert_close(cells[cell], features[3 * cell : 3 * cell + 3].mean(0))
    torch.testing.assert_close(cells[5], features[15])  # the edge cell averages the one slice it has
    assert depth_cell_centres(16, 3, 3).tolist() == [1, 4, 7, 10, 13, 16]


def test_aggregate_depth_is_permutation_invariant_within_a_window() -> None:
    features = torch.randn(9, 5, 2, 2)
    shuffled = features[[2, 0, 1, 5, 3, 4, 8, 7, 6]]
    torch.testing.assert_close(aggregate_depth(shuffled), aggregate_depth(features))
    # ...but not across windows.
    assert not torch.allclose(aggregate_depth(features[[3, 1, 2, 0, 4, 5, 6, 7, 8]]), aggregate_depth(features))


def test_aggregate_depth_stride_1_keeps_full_resolution() -> None:
    features = torch.randn(7, 3, 2, 2)
    cells = aggregate_depth(features, window=3, stride=1)
    assert cells.shape == features.shape
    torch.testing.assert_close(cells[3], features[2:5].mean(0))
    torch.testing.assert_close(cells[0], features[0:2].mean(0))
    torch.testing.assert_close(cells[6], features[5:7].mean(0))
    torch.testing.assert_close(aggregate_depth(features, window=1, stride=1), features)
    with pytest.raises(ValueError, match="stride"):
        aggregate_depth(features, window=1, stride=3)


# ---------------------------------------------------------------------------------------------- flow
def test_log_likelihood_of_identity_is_the_standard_normal_per_dimension() -> None:
    z = torch.randn(10, 6)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).mean(dim=1)
    torch.testing.assert_close(log_likelihood(z, torch.zeros(10)), expected)
    torch.testing.assert_close(log_likelihood(z, torch.full((10,), 3.0)), expected + 0.5)


def test_flow_training_on_gaussian_data_raises_the_likelihood() -> None:
    torch.manual_seed(0)
    flow = ConditionalFlow(dims=8, condition_dims=4, blocks=2)
    mean, scale = torch.linspace(-2, 2, 8), torch.linspace(0.2, 1.5, 8)
    data = torch.randn(512, 8) * scale + mean
    conditions = torch.randn(512, 4)
    held_out = torch.randn(256, 8) * scale + mean
    held_conditions = torch.randn(256, 4)
    with torch.no_grad():
        before = flow.log_likelihood(held_out, held_conditions)
    assert before.shape == (256,) and torch.isfinite(before).all()
    optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        (-flow.log_likelihood(data, conditions).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        after = flow.log_likelihood(held_out, held_conditions).mean()
    # The true density's per-dimension log-likelihood, the ceiling a perfect fit reaches.
    true = torch.distributions.Normal(mean, scale).log_prob(held_out).mean()
    assert after > before.mean() + 0.5
    assert after > true - 0.25


@pytest.mark.parametrize("rows", ["whole grid", "chosen rows"])
def test_factored_conditions_give_freias_flow_and_gradients(rows: str) -> None:
    """The flow's own pass with factored conditions is FrEIA's pass on the conditions row by row."""
    torch.manual_seed(0)
    flow = ConditionalFlow(dims=8, condition_dims=10, blocks=3)
    codes = PositionCodes.on_grid((torch.randn(4, 6), torch.randn(3, 4)), shape=(2, 3, 4), axes=(None, 1, 0))
    if rows == "chosen rows":  # training batches: the codes are gathered, not broadcast over the grid
        codes = codes.select(torch.tensor([5, 0, 23, 5, 11]))
    features = torch.randn(len(codes), 8)
    z, log_jac_det = flow(features, codes)
    z.square().sum().add(log_jac_det.sum()).backward()
    ours = {name: parameter.grad.clone() for name, parameter in flow.named_parameters() if parameter.requires_grad}
    flow.zero_grad()
    freia_z, freia_log_jac_det = flow.inn(features, c=[codes.dense()])
    freia_z.square().sum().add(freia_log_jac_det.sum()).backward()
    torch.testing.assert_close(z, freia_z)
    torch.testing.assert_close(log_jac_det, freia_log_jac_det)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(flow.named_parameters())[name].grad, msg=name)


def test_position_codes_select_and_project_their_rows() -> None:
    codes = PositionCodes.on_grid((torch.randn(4, 2), torch.randn(3, 5)), shape=(3, 4), axes=(1, 0))
    assert codes.index.tolist()[:5] == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]  # row-major: the column runs fastest
    dense = codes.dense()
    weight = torch.randn(6, 7)
    torch.testing.assert_close(codes.project(weight), dense @ weight.T)
    chosen = torch.tensor([5, 0, 5, 11])
    assert torch.equal(codes.select(chosen).dense(), dense[chosen])
    assert torch.equal(PositionCodes.of_rows(dense).dense(), dense)


@pytest.mark.parametrize(("shape", "axes"), [((3, 3, 4), (1, 0, 0)), ((3, 3, 4), (None, 0, 0)), ((3, 4, 2), (0, 1, 0))])
def test_position_codes_of_a_whole_grid_project_as_their_rows_do(shape: tuple, axes: tuple) -> None:
    """A table may run along several dimensions; broadcasting over the grid gives the gathered rows' product."""
    torch.manual_seed(0)
    count = max(axis for axis in axes if axis is not None) + 1
    entries = [math.prod(size for size, axis in zip(shape, axes, strict=True) if axis == table) for table in range(count)]
    codes = PositionCodes.on_grid([torch.randn(size, 3) for size in entries], shape, axes)
    assert len(codes) == math.prod(shape)
    places = torch.stack(torch.meshgrid(*(torch.arange(size) for size in shape), indexing="ij"), dim=-1).reshape(-1, len(shape))
    for table, size in enumerate(entries):  # an entry per combination of places on its dimensions, row-major
        entry = torch.zeros(len(codes), dtype=torch.long)
        for dimension, axis in enumerate(axes):
            if axis == table:
                entry = entry * shape[dimension] + places[:, dimension]
        assert torch.equal(codes.index[:, table], entry) and int(entry.max()) == size - 1
    weight, bias = torch.randn(5, 3 * count), torch.randn(5)
    expected = codes.dense() @ weight.T + bias
    torch.testing.assert_close(codes.project(weight, bias), expected)
    torch.testing.assert_close(PositionCodes(codes.tables, codes.index).project(weight, bias), expected)


def test_conditions_are_the_2d_code_then_the_depth_code_of_each_cell(volume: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2, smoothing_sigma=1.0))
    window, stride = model.settings.depth_window, model.settings.depth_stride
    plane = positional_encoding_2d(128, 3, 4).expand(5, -1, -1, -1)
    depth = positional_encoding_1d(depth_cell_centres(13, window, stride), 32)[:, :, None, None].expand(-1, -1, 3, 4)
    expected = model.to_rows(torch.cat([plane, depth], dim=1))
    assert torch.equal(model.conditions((5, 3, 4), 13).dense(), expected)
    images = model.conditions((5, 3, 4), None).dense()  # independent images: a zero depth code
    assert torch.equal(images, torch.cat([expected[:, :128], torch.zeros(60, 32)], dim=1))
    # Training batches: one grid for volumes of different depths, each cell keeps its own code.
    parts = model.training_cells(volume, [slice(0, 16), slice(0, 7)])
    _, conditions = model.flow_batch(parts)
    each = [model.conditions(part.keep.shape, part.depth).dense()[part.keep.flatten()] for part in parts]
    assert torch.equal(conditions.dense(), torch.cat(each))


def test_flow_construction_is_reproducible_under_a_seed() -> None:
    torch.manual_seed(3)
    first = ConditionalFlow(dims=6, condition_dims=4, blocks=2)
    torch.manual_seed(3)
    second = ConditionalFlow(dims=6, condition_dims=4, blocks=2)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -------------------------------------------------------------------------------------------- losses
def test_normal_boundary_is_the_lower_5_percent_quantile() -> None:
    values = torch.arange(200.0)[torch.randperm(200)]
    assert normal_boundary(values, beta=0.05).item() == 10.0
    assert normal_boundary(values, beta=0.0).item() == 0.0


def likelihoods() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    normal = -1.4 + 0.5 * torch.randn(256, generator=generator)
    noised = -2.0 + 0.8 * torch.randn(256, generator=generator)
    return normal, noised


@pytest.mark.parametrize(
    "loss", [BoundaryGuidedSemiPushPullLoss(), BoundaryGuidedSemiPushPullLoss(focal=False), TripletLikelihoodLoss()]
)
def test_losses_fall_as_normals_rise_and_anomalies_sink(loss) -> None:
    normal, noised = likelihoods()
    base = loss(normal, noised)
    assert torch.isfinite(base)
    assert loss(normal + 0.5, noised) < base
    assert loss(normal, noised - 0.5) < base


@pytest.mark.parametrize("loss", [BoundaryGuidedSemiPushPullLoss(), TripletLikelihoodLoss()])
def test_loss_gradients_push_normals_up_and_anomalies_down(loss) -> None:
    normal, noised = (t.clone().requires_grad_(True) for t in likelihoods())
    loss(normal, noised).backward()
    assert (normal.grad <= 0).all() and (normal.grad < 0).any()
    assert (noised.grad >= 0).all() and (noised.grad > 0).any()


def test_bgspp_pushes_only_anomalies_above_the_abnormal_boundary() -> None:
    loss = BoundaryGuidedSemiPushPullLoss(focal=False)
    normal, noised = likelihoods()
    noised = noised.clone().requires_grad_(True)
    loss(normal, noised).backward()
    _, b_abnormal = loss.boundaries(normal)
    inside = noised.detach() / loss.normalizer >= b_abnormal
    assert inside.any() and (~inside).any()
    assert (noised.grad[~inside] == 0).all()
    assert (noised.grad[inside] > 0).all()
    # Pseudo-anomalies far below every boundary cost nothing beyond the likelihood term.
    far = torch.full((256,), -100.0)
    normal_only = BoundaryGuidedSemiPushPullLoss(focal=False, contrast_weight=0.0)(normal, far)
    pull = loss(normal, far) - normal_only
    assert pull >= 0
    b_normal, _ = loss.boundaries(normal)
    below = normal / loss.normalizer <= b_normal
    torch.testing.assert_close(pull, (b_normal - normal[below] / loss.normalizer).mean())


def test_focal_weights_stress_hard_examples_and_are_continuous() -> None:
    scaled = torch.tensor([-0.1, -0.2 + 1e-4, -0.2, -0.5, -1.0])
    weights = normal_focal_weights(scaled * 10)
    assert weights[0] == 1 and math.isclose(weights[1].item(), 1.0)
    assert abs(weights[2].item() - 1.0) < 0.1  # continuous at the threshold
    assert weights[2] < weights[3] < weights[4]  # less likely normals weigh more
    abnormal = abnormal_focal_weights(torch.tensor([-20.0, -10.0 + 1e-3, -5.0, -1.0]))
    assert abnormal[0] == 1 and abs(abnormal[1].item() - 1.0) < 0.1
    assert abnormal[1] < abnormal[2] < abnormal[3]  # more likely pseudo-anomalies weigh more


def test_triplet_loss_is_likelihood_only_beyond_the_margin() -> None:
    normal, _ = likelihoods()
    loss = TripletLikelihoodLoss(margin=0.1)
    far_below = loss(normal, normal - 0.2)
    torch.testing.assert_close(far_below, -F.logsigmoid(normal).mean())
    torch.testing.assert_close(loss(normal, normal), far_below + 0.1)
    with pytest.raises(ValueError, match="pairs"):
        loss(normal, normal[:10])


def test_feature_noise_has_the_requested_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.zeros(4000, 16)
    noised = add_feature_noise(features, 0.08, generator=generator)
    assert abs(noised.std().item() - 0.08) < 0.002


def test_standardizer_is_the_identity_until_fitted_then_standardises() -> None:
    standardizer = FeatureStandardizer(4)
    rows = torch.randn(5000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 7.0
    torch.testing.assert_close(standardizer(rows), rows)
    standardizer.fit(rows)
    out = standardizer(rows)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=0), torch.ones(4), atol=1e-4, rtol=0)
    assert bool(standardizer.fitted) and set(standardizer.state_dict()) == {"mean", "std", "fitted"}


def test_brain_cell_share_follows_the_feature_cells() -> None:
    brain = torch.zeros(6, 8, 8, dtype=torch.bool)
    brain[0:3, 0:4, 0:4] = True  # the first depth cell's top-left quarter, full
    brain[3, 4:8, 4:8] = True  # one slice of the second cell's bottom-right quarter
    share = brain_cell_share(brain, (2, 2), window=3, stride=3)
    torch.testing.assert_close(share, torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1 / 3]]]))


def test_training_features_of_brain_cells_only(tiny_model: SimpleSliceNetModel, volume: torch.Tensor) -> None:
    brain = torch.zeros(16, 32, 32, dtype=torch.bool)
    brain[:, 4:20, 8:24] = True
    every, every_conditions = tiny_model.training_features(volume, [slice(0, 16)])
    kept, kept_conditions = tiny_model.training_features(volume, [slice(0, 16)], brain=brain)
    features = tiny_model.encoder(volume)
    share = brain_cell_share(brain, features.shape[-2:], tiny_model.settings.depth_window, tiny_model.settings.depth_stride)
    inside = share.flatten() > 0
    assert 0 < inside.sum() < inside.numel()
    torch.testing.assert_close(kept, every[inside])
    torch.testing.assert_close(kept_conditions.dense(), every_conditions.dense()[inside])


def test_standardised_model_fits_once_and_scores_standardised_rows(volume: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2, smoothing_sigma=1.0))  # the package's variant
    rows, _ = model.training_features(volume, [slice(0, 16)])
    torch.testing.assert_close(rows.mean(dim=0), torch.zeros(model.feature_dim), atol=1e-4, rtol=0)
    mean = model.standardizer.mean.clone()
    model.training_features(volume.flip(0) * 0.5, [slice(0, 8), slice(8, 16)])  # a second batch: no refit
    torch.testing.assert_close(model.standardizer.mean, mean, rtol=0, atol=0)
    model.eval()
    cells, conditions = model.volume_cells(model.encoder(volume))
    expected = model.flow.log_likelihood(model.standardizer(model.to_rows(cells)), conditions.dense())
    torch.testing.assert_close(model.log_likelihood_grid(cells, conditions).flatten(), expected.flatten())
    assert "standardizer.std" in model.state_dict()
    assert "standardizer.std" not in SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2, variant="paper")).state_dict()


def test_unknown_settings_are_refused_with_their_name() -> None:
    for setting, value in (("variant", "lab"), ("loss", "focal"), ("mode", "volumetric"), ("layers", "blocks.1")):
        with pytest.raises(ValueError, match=setting):
            SimpleSliceNet(**{setting: value})
    with pytest.raises(ValueError, match="depth_stride"):
        SimpleSliceNet(depth_window=3, depth_stride=4)
    with pytest.raises(ValueError, match="smoothing_sigma"):
        SimpleSliceNet(smoothing_sigma="wide")


# --------------------------------------------------------------------------------------- anomaly map
def test_score_is_zero_at_the_most_likely_cell() -> None:
    grid = torch.tensor([[[-1.0, -2.0], [-1.5, -3.0]]])
    score = likelihood_to_score(grid)
    assert score[0, 0, 0] == 0
    torch.testing.assert_close(score[0, 1, 1], 1 - torch.exp(torch.tensor(-2.0)))


def test_anomaly_map_upsamples_and_smooths() -> None:
    grid = torch.full((6, 4, 4), -1.0)
    grid[3, 2, 1] = -4.0
    sharp = AnomalyMapGenerator(sigma=0, peak=False).volume_map(grid, (16, 32, 32))
    smooth = AnomalyMapGenerator(sigma=4, peak=False).volume_map(grid, (16, 32, 32))
    assert sharp.shape == smooth.shape == (16, 32, 32)
    assert smooth.max() < sharp.max()
    # Smoothing acts on the upsampled voxel map, not on the coarse cell grid.
    from scipy import ndimage

    expected = torch.from_numpy(ndimage.gaussian_filter(sharp.double().numpy(), sigma=4.0))  # reflect, truncate 4
    torch.testing.assert_close(smooth.double(), expected, rtol=0, atol=1e-5)
    assert (smooth > 1.0 + 1e-3).sum() > (sharp > 1.0 + 1e-3).sum()
    images = AnomalyMapGenerator(sigma=2).image_maps(grid, (32, 32))
    assert images.shape == (6, 32, 32)
    # A uniform image scores zero everywhere (up to the rounding of smoothing a constant).
    assert images[0].abs().max() < 1e-6


def test_authors_order_smooths_the_likelihood_with_scipys_defaults() -> None:
    from scipy import ndimage

    torch.manual_seed(0)
    grid = -torch.rand(5, 4, 6, dtype=torch.float64) * 3
    size = (15, 12, 18)
    upsampled = F.interpolate(grid[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    smoothed = torch.from_numpy(ndimage.gaussian_filter(upsampled.numpy(), sigma=2.0))  # reflect, truncate 4
    expected = 1 - torch.exp(smoothed - smoothed.max())
    generator = AnomalyMapGenerator(sigma=2.0, peak=True)
    torch.testing.assert_close(generator.volume_map(grid, size).double(), expected, rtol=0, atol=1e-5)
    assert generator.volume_map(grid, size).min() == 0  # still 0 at the most likely voxel


def test_map_without_reference_is_the_smoothed_negative_log_likelihood() -> None:
    torch.manual_seed(0)
    grid = -torch.rand(5, 4, 6) * 3
    size = (15, 12, 18)
    negative = AnomalyMapGenerator(sigma=2.0, peak=False).volume_map(grid, size)
    peak = AnomalyMapGenerator(sigma=2.0, peak=True).volume_map(grid, size)
    # The paper's map is a per-volume function of this one: 1 − exp(ℓ − max ℓ) with ℓ = −map.
    torch.testing.assert_close(peak, 1 - torch.exp(-negative - (-negative).max()), rtol=0, atol=1e-6)
    # A shift of every log-likelihood shifts the map by as much (the peak reference would hide it).
    torch.testing.assert_close(AnomalyMapGenerator(sigma=2.0, peak=False).volume_map(grid - 1.5, size), negative + 1.5)


def test_brain_median_reference_centres_each_volume_on_its_own_brain() -> None:
    from simpleslicenet.models.scoring import VolumeScoring, score_volumes

    torch.manual_seed(0)
    raw = torch.randn(12, 16, 16)
    brain = torch.zeros(12, 16, 16, dtype=torch.bool)
    brain[:, 4:12, 4:12] = True
    raw[:, :4] = 50.0  # background far above the brain: outside the mask it must not move the centre
    rows = [slice(0, 6), slice(6, 12)]
    centred = score_volumes(raw, brain, rows, VolumeScoring(map_reference="brain_median"))
    for part in rows:
        inside = centred.anomaly_map[part][brain[part]]
        assert inside.median().abs() < 1e-6
        expected = raw[part][brain[part]].max() - raw[part][brain[part]].median()
        torch.testing.assert_close(centred.volume_scores[part][0], expected)
    # An offset of one whole volume's map changes none of its centred scores; uncentred, it does.
    shifted = raw.clone()
    shifted[6:] += 3.0
    again = score_volumes(shifted, brain, rows, VolumeScoring(map_reference="brain_median"))
    torch.testing.assert_close(again.anomaly_map, centred.anomaly_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.volume_scores, centred.volume_scores, rtol=0, atol=1e-5)
    plain = score_volumes(shifted, brain, rows, VolumeScoring()).volume_scores
    assert plain[6] - score_volumes(raw, brain, rows, VolumeScoring()).volume_scores[6] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown map_reference"):
        VolumeScoring(map_reference="peak")


def test_smoothing_within_the_brain_matches_masked_scipy_filters() -> None:
    import numpy as np
    from scipy import ndimage

    from simpleslicenet.models.smoothing import masked_gaussian_blur_3d

    torch.manual_seed(0)
    volume = torch.randn(10, 14, 12, dtype=torch.float64)
    brain = torch.zeros(10, 14, 12, dtype=torch.bool)
    brain[2:9, 3:12, 2:10] = True
    brain[5, 3:6, 2:5] = False  # a hole: it must not count either
    smoothed = masked_gaussian_blur_3d(volume, brain, 1.5)
    # Normalised convolution, written with scipy's filter (mirrored ends, radius 4 sigma).
    inside = ndimage.gaussian_filter(np.where(brain, volume.numpy(), 0.0), 1.5, mode="reflect", truncate=4.0)
    weight = ndimage.gaussian_filter(brain.double().numpy(), 1.5, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(smoothed[brain].numpy(), (inside / weight)[brain.numpy()], rtol=1e-10, atol=1e-12)
    # Whatever lies outside the brain, even infinite, never reaches a brain voxel.
    hot = torch.where(brain, volume, torch.inf)
    torch.testing.assert_close(masked_gaussian_blur_3d(hot, brain, 1.5)[brain], smoothed[brain])
    # With every voxel counted it is plain smoothing.
    everything = torch.ones_like(brain)
    plain = ndimage.gaussian_filter(volume.numpy(), 1.5, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(masked_gaussian_blur_3d(volume, everything, 1.5).numpy(), plain, rtol=1e-10, atol=1e-12)


def test_scoring_smooths_within_the_brain_so_background_does_not_reach_it() -> None:
    from simpleslicenet.models.scoring import VolumeScoring, score_volumes
    from simpleslicenet.models.smoothing import apply_separable, gaussian_matrix

    brain = torch.zeros(12, 20, 20, dtype=torch.bool)
    brain[:, 5:15, 5:15] = True
    raw = torch.zeros(12, 20, 20)
    raw[:, :, :5] = 100.0  # the background next to one side of the brain scores far above it
    rows = [slice(0, 12)]
    within = score_volumes(raw, brain, rows, VolumeScoring(map_reference="brain_median", smoothing_sigma=2.0))
    assert within.anomaly_map[brain].abs().max() < 1e-5  # the brain stays flat
    assert within.volume_scores[0].abs() < 1e-5
    # Smoothed over the whole slab (as the paper variant's graph does) the brain's edge lights up.
    matrices = [gaussian_matrix(n, 2.0, 4.0, mode="reflect") for n in raw.shape]
    slab = score_volumes(apply_separable(raw, matrices), brain, rows, VolumeScoring(map_reference="brain_median"))
    assert slab.volume_scores[0] > 1.0
    assert slab.anomaly_map[:, 8:12, 5].min() > slab.anomaly_map[:, 8:12, 14].max()
    with pytest.raises(ValueError, match="smoothing_sigma"):
        VolumeScoring(smoothing_sigma=-1.0)


def test_variant_places_the_map_in_the_graph_or_the_scoring_step() -> None:
    default = SimpleSliceNet(flow_blocks=1, backbone_weights="random", smoothing_sigma=2.5)
    # The package's map: the graph gives -l upsampled only; the scoring step smooths within the brain
    # and centres on the median brain voxel, also in deployment (the scoring record travels with the model).
    assert (default.model.anomaly_map_generator.peak, default.model.anomaly_map_generator.sigma) == (False, 0.0)
    assert (default.scoring.map_reference, default.scoring.smoothing_sigma) == ("brain_median", 2.5)
    assert default.metadata()["scoring"]["smoothing_sigma"] == 2.5
    # The paper's: 1 - exp(l - max l) of l smoothed over the slab, all in the graph.
    paper = SimpleSliceNet(flow_blocks=1, backbone_weights="random", smoothing_sigma=2.5, variant="paper")
    assert (paper.model.anomaly_map_generator.peak, paper.model.anomaly_map_generator.sigma) == (True, 2.5)
    assert (paper.scoring.map_reference, paper.scoring.smoothing_sigma) == ("none", 0.0)
    # A smoothing resolved from the data retunes the built model (no new weights) and moves with the variant.
    flow = default.model.flow
    default.use_settings(dataclasses.replace(default.settings, smoothing_sigma=1.5))
    assert default.model.flow is flow and default.scoring.smoothing_sigma == 1.5
    # A checkpoint of the paper's variant brings its map, whatever this instance was built with.
    default.on_load_checkpoint({"hyper_parameters": dict(paper.hparams), "simpleslicenet": paper.metadata()})
    assert (default.model.anomaly_map_generator.peak, default.scoring.map_reference) == (True, "none")
    assert default.settings == dataclasses.replace(paper.settings, slice_padding=16)  # "auto" recorded as built
    # Independent 2-D images have no brain scoring step: their smoothing stays in the graph.
    images = SimpleSliceNet(flow_blocks=1, backbone_weights="random", smoothing_sigma=2.5, mode="2d")
    assert (images.model.anomaly_map_generator.sigma, images.scoring.smoothing_sigma) == (2.5, 0.0)


def test_variant_sets_the_training_behaviour() -> None:
    package, paper = SimpleSliceNetSettings(), SimpleSliceNetSettings(variant="paper")
    assert (package.depth_position, package.standardize_features, package.train_on_brain_cells) == (True, True, True)
    assert (paper.depth_position, paper.standardize_features, paper.train_on_brain_cells) == (False, False, False)
    assert (package.features_per_step, paper.features_per_step) == (1024, 4096)


def test_settings_resolve_from_the_training_data_and_round_trip() -> None:
    settings = SimpleSliceNetSettings(flow_blocks=1)
    assert settings.unresolved == ("layers", "smoothing_sigma", "slice_padding")
    resolved = settings.resolved((96, 104), 2.0)
    assert resolved.layers == ("blocks.1", "blocks.2") and resolved.smoothing_sigma == 2.0
    assert settings.resolved((192, 192), 1.0).layers == ("blocks.2", "blocks.4")
    assert SimpleSliceNetSettings.from_hparams({**resolved.to_dict(), "evaluator": True}) == resolved
    assert resolved.to_dict()["layers"] == ["blocks.1", "blocks.2"]


# -------------------------------------------------------------------------------------- torch model
def test_forward_gives_slice_scores_and_a_voxel_map(tiny_model, volume) -> None:
    with torch.no_grad():
        prediction = tiny_model(volume)
    assert prediction.pred_score.shape == (16,)
    assert prediction.anomaly_map.shape == (16, 32, 32)
    torch.testing.assert_close(prediction.pred_score, prediction.anomaly_map.flatten(1).amax(1))
    assert torch.isfinite(prediction.anomaly_map).all()


def test_forward_is_deterministic_under_a_seed(tiny_model, volume) -> None:
    torch.manual_seed(0)
    twin = SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=2, smoothing_sigma=1.0, variant="paper")).eval()
    with torch.no_grad():
        first, again, other = tiny_model(volume), tiny_model(volume), twin(volume)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    torch.testing.assert_close(first.anomaly_map, other.anomaly_map, rtol=0, atol=0)


def test_training_mode_exposes_features_and_conditions(volume) -> None:
    torch.manual_seed(0)
    model = SimpleSliceNetModel(SimpleSliceNetSettings(flow_blocks=1, embed_dim=8)).train()
    assert not model.encoder.backbone.training  # the frozen backbone keeps its batch-norm statistics
    features, conditions = model(volume)
    # 32×32 slices → 4×4 locations at stride 8; 16 slices → 6 depth cells.
    assert features.shape == (6 * 4 * 4, 8)
    assert conditions.dense().shape == (6 * 4 * 4, 128 + 32)  # in-plane and depth codes
    assert not features.requires_grad


# ---------------------------------------------------------------------------------- lightning model
def volume_batch(volumes: list[torch.Tensor]):
    from simpleslicenet.data.batch import collate_volumes
    from simpleslicenet.data.dataset import volume_to_batch
    from simpleslicenet.data.geometry import from_slices

    batches = []
    for index, slices in enumerate(volumes):
        image = from_slices(slices.numpy())  # [D, H, W] → canonical (x, y, z)
        lesion = image > 0.97
        batches.append(volume_to_batch(image, lesion_mask=lesion, volume_index=index))
    return collate_volumes(batches)


@pytest.fixture(scope="session")
def lightning_model() -> SimpleSliceNet:
    torch.manual_seed(0)
    return SimpleSliceNet(flow_blocks=2, smoothing_sigma=1.0)


def test_prediction_per_volume_never_mixes_volumes(lightning_model) -> None:
    generator = torch.Generator().manual_seed(2)
    first, second = torch.rand(9, 32, 32, generator=generator), torch.rand(7, 32, 32, generator=generator)
    model = lightning_model.eval()
    with torch.no_grad():
        both = model.validation_step(volume_batch([first, second]))
        alone = model.validation_step(volume_batch([second]))
    assert both.anomaly_map.shape == (16, 32, 32) and both.pred_score.shape == (16,)
    torch.testing.assert_close(both.anomaly_map[9:], alone.anomaly_map)
    assert torch.unique(both.volume_score[:9]).numel() == 1
    torch.testing.assert_close(both.volume_score[9:], alone.anomaly_map.max().expand(7))


def test_training_steps_move_only_the_flow(lightning_model) -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(3)
    batches = [volume_batch([torch.rand(12, 32, 32, generator=generator)]) for _ in range(2)]
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    flow_before = [p.detach().clone() for p in lightning_model.model.flow.parameters()]
    backbone_before = {k: v.clone() for k, v in lightning_model.model.encoder.backbone.state_dict().items()}
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(lightning_model, train_dataloaders=loader)
    # 12 slices of 32×32 → 4 depth cells × 4×4 locations = 64 features: one flow step per volume.
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, lightning_model.model.flow.parameters(), strict=True))
    for key, value in lightning_model.model.encoder.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_two_dimensional_mode_on_plain_images() -> None:
    from anomalib.data import ImageBatch

    torch.manual_seed(0)
    model = SimpleSliceNet(flow_blocks=1, smoothing_sigma=1.0, mode="2d").eval()
    batch = ImageBatch(image=torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        predicted = model.validation_step(batch)
    assert predicted.anomaly_map.shape == (3, 32, 32)
    assert predicted.pred_score.shape == (3,)


# --------------------------------------------------------------------------------- the paper's model
def test_paper_config_builds_the_papers_model() -> None:
    """``simpleslicenet_paper.yaml`` is the paper's model: stages, cells, flow, loss, map and training."""
    from simpleslicenet.models.registry import config_init_args, packaged_config
    from simpleslicenet.models.simpleslicenet.flow import ConditionalFlow
    from simpleslicenet.models.simpleslicenet.loss import BoundaryGuidedSemiPushPullLoss

    init_args = config_init_args(packaged_config("simpleslicenet_paper.yaml"))
    settings = SimpleSliceNetSettings(**init_args)
    assert settings.backbone == "wide_resnet50_2.tv_in1k" and settings.layers == ("layer2", "layer3")
    assert (settings.embed_dim, settings.neighbourhood, settings.slice_padding) == (512, 3, 0)
    assert (settings.depth_window, settings.depth_stride, settings.flow_blocks, settings.lr) == (3, 3, 8, 1e-3)
    assert settings.features_per_step == 4096 and not settings.train_on_brain_cells
    model = SimpleSliceNet(**{**init_args, "backbone_weights": "random"})
    assert isinstance(model.loss, BoundaryGuidedSemiPushPullLoss)
    torch_model = model.model
    assert torch_model.encoder.layer_channels == [512, 1024] and torch_model.feature_dim == 512
    assert torch_model.standardizer is None and not torch_model.settings.depth_position
    flow: ConditionalFlow = torch_model.flow
    assert (flow.condition_dims, len(flow.inn.module_list), flow.inn.module_list[0].clamp) == (128, 8, 1.9)
    generator = torch_model.anomaly_map_generator
    assert (generator.peak, generator.sigma) == (True, 4.0)
    assert (model.scoring.map_reference, model.scoring.smoothing_sigma) == ("none", 0.0)
    # 192x192 slices give the paper's 24x24 cells; 96 slices its 32 depth triplets.
    cells, conditions = torch_model.volume_cells(torch.randn(96, 512, 24, 24))
    assert cells.shape == (32, 512, 24, 24) and conditions.dense().shape == (32 * 24 * 24, 128)


def test_the_1mm_config_reads_a_192_slice_in_cells_of_4_voxels() -> None:
    """``simpleslicenet_1mm.yaml`` differs from the stock model only in its stages: a 48x48 grid, not 24x24."""
    from simpleslicenet.models.registry import config_init_args, packaged_config

    init_args = config_init_args(packaged_config("simpleslicenet_1mm.yaml"))
    assert set(init_args) == {"layers"}
    fine = SimpleSliceNet(**{**init_args, "flow_blocks": 1, "backbone_weights": "random"}).model.encoder
    stock = SimpleSliceNet(flow_blocks=1, backbone_weights="random").model.encoder
    stock_grid = stock(torch.randn(1, 3, 192, 192))
    fine_grid = fine(torch.randn(1, 3, 192, 192))
    assert fine_grid.shape[-2:] == (48, 48) and fine.stride == 4
    assert stock_grid.shape[-2:] == (24, 24) and stock.stride == 8
