"""Tests of the volumetric metrics: known cases, binned vs exact, brain masking, grouping, DDP merging."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.metrics import Evaluator

from simpleslicenet.data.batch import collate_volumes
from simpleslicenet.data.dataset import volume_to_batch
from simpleslicenet.metrics import (
    PaperMeanDice,
    PaperVoxelAUROC,
    ScoreHistogram,
    SliceAUROC,
    ValidationDiceThreshold,
    VolumeAUROC,
    VoxelAUPRC,
    VoxelAUROC,
    VoxelDiceAtThreshold,
    VoxelMaxDice,
    VoxelPerVolumeMean,
    auroc_error_bound,
    auroc_from_counts,
    average_precision_from_counts,
    default_volume_evaluator,
    dice_at_threshold,
    exact_auroc,
    exact_average_precision,
    exact_max_dice,
    exact_threshold_for_max_dice,
    max_dice_from_counts,
    threshold_for_max_dice,
    volume_test_metrics,
)

SHAPE = (32, 32, 16)  # canonical (x, y, z): 16 slices of 32 x 32


def _brain(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (x**2 / 0.8 + y**2 / 0.7 + z**2 / 0.9) < 1


def _lesion(centre: tuple[int, int, int], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) < radius**2


def make_batch(
    volume_index: int,
    lesion: np.ndarray | None,
    anomaly_map: np.ndarray,
    volume_score: float | None = None,
    brain: np.ndarray | None = None,
):
    """A VolumeBatch of one volume with predictions (maps given in canonical (x, y, z))."""
    brain = _brain() if brain is None else brain
    rng = np.random.default_rng(volume_index)
    image = rng.random(SHAPE).astype(np.float32) * brain
    batch = volume_to_batch(image, brain_mask=brain, lesion_mask=lesion, volume_index=volume_index)
    slices = torch.from_numpy(np.ascontiguousarray(anomaly_map.transpose(2, 1, 0))).float()  # -> [D, H, W]
    in_brain = slices[torch.from_numpy(np.ascontiguousarray(brain.transpose(2, 1, 0)))]
    score = float(in_brain.max()) if volume_score is None else volume_score
    batch.update(
        anomaly_map=slices,
        pred_score=slices.flatten(1).amax(1),
        volume_score=torch.full((slices.shape[0],), score),
    )
    return batch


@pytest.fixture(scope="session")
def structured_batches():
    """Six volumes (four with a lesion): lesion signal plus smooth noise, different ranges per volume."""
    rng = np.random.default_rng(0)
    batches = []
    for index in range(6):
        lesion = _lesion((10 + index, 16, 8), 3.0 + index % 3) & _brain() if index < 4 else None
        noise = rng.normal(size=SHAPE)
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1)) / 3  # a little spatial structure
        signal = 1.2 * lesion if lesion is not None else 0.0
        scale = 1.0 + 0.5 * index  # volumes differ in range: pooled and per-volume results differ
        batches.append(make_batch(index, lesion, (noise + signal) * scale + index))
    return batches


def pooled_brain_voxels(batches) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.cat([b.anomaly_map.as_subclass(torch.Tensor)[b.brain_mask] for b in batches])
    labels = torch.cat([b.gt_mask.as_subclass(torch.Tensor)[b.brain_mask] for b in batches])
    return scores, labels


def run(metric, batches):
    for batch in batches:
        metric.update(batch)
    return float(metric.compute())


# --------------------------------------------------------------------------- exact references


def test_exact_references_match_brute_force() -> None:
    """Sort-based references against a direct pairwise/threshold enumeration, with ties."""
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.integers(0, 12, 200).astype(np.float64))  # many ties
    labels = torch.from_numpy(rng.random(200) < 0.3)
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert exact_auroc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)

    thresholds = torch.unique(scores).flip(0)
    ap, previous_recall, best_dice = 0.0, 0.0, 0.0
    for t in thresholds:
        predicted = scores >= t
        tp = float((predicted & labels).sum())
        recall = tp / float(labels.sum())
        ap += (recall - previous_recall) * tp / float(predicted.sum())
        previous_recall = recall
        best_dice = max(best_dice, dice_at_threshold(scores, labels, float(t)))
    assert exact_average_precision(scores, labels) == pytest.approx(ap, abs=1e-12)
    assert exact_max_dice(scores, labels) == pytest.approx(best_dice, abs=1e-12)
    assert dice_at_threshold(scores, labels, exact_threshold_for_max_dice(scores, labels)) == pytest.approx(best_dice)


def test_exact_references_match_sklearn_when_available() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    labels = rng.random(500) < 0.2
    scores = rng.normal(size=500) + labels
    assert exact_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        metrics.roc_auc_score(labels, scores), abs=1e-12
    )
    assert exact_average_precision(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        metrics.average_precision_score(labels, scores), abs=1e-12
    )


# --------------------------------------------------------------------------- histogram


def test_histogram_grid_does_not_depend_on_arrival_order() -> None:
    """Growing the range merges cells exactly: streamed in any order, the counts are the same."""
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(np.concatenate([rng.normal(0, 0.01, 3000), rng.normal(50, 5, 3000)]))
    labels = torch.from_numpy(rng.random(6000) < 0.2)
    one_go = ScoreHistogram(1024)
    one_go.update(scores, labels)
    streamed = ScoreHistogram(1024)
    for part in torch.split(torch.arange(6000), 500):  # narrow range first, then it grows
        streamed.update(scores[part], labels[part])
    assert (one_go.exponent, one_go.offset) == (streamed.exponent, streamed.offset)
    assert torch.equal(one_go.positives, streamed.positives)
    assert torch.equal(one_go.negatives, streamed.negatives)
    assert int(one_go.positives.sum() + one_go.negatives.sum()) == 6000
    edges = one_go.bin_edges
    assert edges[0] <= scores.min() and scores.max() < edges[-1]
    # Finest power-of-two grid: halving the width would not cover the range.
    assert (scores.max() - scores.min()) / (2 ** one_go.exponent / 2) >= 1024 - 2


def test_histogram_rejects_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        ScoreHistogram(64).update(torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))


def test_binned_matches_exact_on_structured_data(structured_batches) -> None:
    """AUROC, AUPRC, max Dice from 16k-bin histograms agree with the exact ones to 1e-3."""
    scores, labels = pooled_brain_voxels(structured_batches)
    hist = ScoreHistogram()
    for batch in structured_batches:
        hist.update(batch.anomaly_map.as_subclass(torch.Tensor)[batch.brain_mask], batch.gt_mask[batch.brain_mask])
    binned_auroc = auroc_from_counts(hist.positives, hist.negatives)
    exact = exact_auroc(scores, labels)
    assert binned_auroc == pytest.approx(exact, abs=1e-3)
    assert abs(binned_auroc - exact) <= auroc_error_bound(hist.positives, hist.negatives) + 1e-12
    assert average_precision_from_counts(hist.positives, hist.negatives) == pytest.approx(
        exact_average_precision(scores, labels), abs=1e-3
    )
    binned_dice = max_dice_from_counts(hist.positives, hist.negatives)
    exact_dice = exact_max_dice(scores, labels)
    assert binned_dice == pytest.approx(exact_dice, abs=1e-3)
    assert binned_dice <= exact_dice + 1e-12  # bin edges are a subset of the exact thresholds
    # The chosen threshold reproduces the binned max Dice exactly on the same data.
    assert dice_at_threshold(scores, labels, threshold_for_max_dice(hist)) == pytest.approx(binned_dice, abs=1e-12)


# --------------------------------------------------------------------------- known cases


def _volumes_with(map_for):  # noqa: ANN001, ANN202
    lesions = [_lesion((12, 14, 7), 4) & _brain(), _lesion((20, 18, 9), 3) & _brain(), None]
    return [make_batch(i, lesion, map_for(i, lesion)) for i, lesion in enumerate(lesions)]


def test_perfect_map_scores_one() -> None:
    batches = _volumes_with(lambda i, lesion: (lesion if lesion is not None else np.zeros(SHAPE)).astype(float))
    assert run(VoxelAUROC(), batches) == pytest.approx(1.0)
    assert run(VoxelAUPRC(), batches) == pytest.approx(1.0)
    assert run(VoxelMaxDice(), batches) == pytest.approx(1.0)
    assert run(VolumeAUROC(), batches) == pytest.approx(1.0)
    assert run(SliceAUROC(), batches) == pytest.approx(1.0)


def test_inverted_map_scores_zero_auroc() -> None:
    batches = _volumes_with(lambda i, lesion: -(lesion if lesion is not None else np.zeros(SHAPE)).astype(float))
    assert run(VoxelAUROC(), batches) == pytest.approx(0.0)
    assert run(VoxelAUPRC(), batches) < 0.2


def test_random_map_scores_chance() -> None:
    """AUROC ~ 0.5 and AUPRC ~ lesion fraction, within tolerances set by the sample size."""
    rng = np.random.default_rng(4)
    lesions = [_lesion((16, 16, 8), 5) & _brain(), _lesion((10, 20, 6), 4) & _brain(), None, None]
    batches = [make_batch(i, lesion, rng.random(SHAPE)) for i, lesion in enumerate(lesions)]
    _, labels = pooled_brain_voxels(batches)
    n_pos, n = int(labels.sum()), labels.numel()
    prevalence = n_pos / n
    # Under a random ranking AUROC has standard deviation sqrt((P + N + 1) / (12 P N)) (Mann-Whitney).
    auroc_sd = math.sqrt((n + 1) / (12 * n_pos * (n - n_pos)))
    # AP averages a running proportion over the P positives: spread about prevalence / sqrt(P)
    # (a simulation at prevalence 0.05, P = 3000 gave 0.0009 against 0.0009 predicted).
    ap_sd = prevalence / math.sqrt(n_pos)
    assert run(VoxelAUROC(), batches) == pytest.approx(0.5, abs=5 * auroc_sd)
    assert run(VoxelAUPRC(), batches) == pytest.approx(prevalence, abs=5 * ap_sd + 1e-3)


def test_brain_mask_excludes_background(structured_batches) -> None:
    """A map that is hot only outside the brain gives the same results as the original."""
    hot = []
    for batch in structured_batches:
        changed = copy.copy(batch)
        anomaly_map = batch.anomaly_map.as_subclass(torch.Tensor).clone()
        anomaly_map[~batch.brain_mask] = 1e6
        changed.anomaly_map = anomaly_map
        hot.append(changed)
    for metric_class in (VoxelAUROC, VoxelAUPRC, VoxelMaxDice):
        assert run(metric_class(), hot) == run(metric_class(), structured_batches)
    # Without the brain mask the hot background would matter: the check above can fail.
    unmasked = VoxelAUROC(fields=["anomaly_map", "gt_mask"])
    assert run(unmasked, hot) < run(VoxelAUROC(), structured_batches) - 0.05


def test_volume_level_groups_rows_by_volume() -> None:
    lesion = _lesion((16, 16, 8), 4) & _brain()
    healthy = make_batch(0, None, np.zeros(SHAPE), volume_score=0.2)
    sick = make_batch(1, lesion, np.zeros(SHAPE), volume_score=0.7)
    metric = VolumeAUROC()
    metric.update(collate_volumes([healthy, sick]))  # two volumes in one batch: 32 rows
    ids, scores, labels = metric.entries()
    assert ids.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.2, 0.7])
    assert labels.tolist() == [0, 1]
    assert float(metric.compute()) == pytest.approx(1.0)
    flipped = VolumeAUROC()
    flipped.update(make_batch(0, None, np.zeros(SHAPE), volume_score=0.9))
    flipped.update(sick)
    assert float(flipped.compute()) == pytest.approx(0.0)


def test_dice_at_threshold_equals_direct_computation(structured_batches) -> None:
    scores, labels = pooled_brain_voxels(structured_batches)
    threshold = float(scores.quantile(0.97))
    metric = VoxelDiceAtThreshold(threshold=threshold)
    assert run(metric, structured_batches) == pytest.approx(dice_at_threshold(scores, labels, threshold), abs=1e-12)
    predicted = scores >= threshold
    direct = 2 * float((predicted & labels).sum()) / float(predicted.sum() + labels.sum())
    assert float(metric.compute()) == pytest.approx(direct, abs=1e-12)


def test_validation_threshold_flows_to_test_dice(structured_batches) -> None:
    """The val metric picks the threshold; the test metric applies it (exactly, to new data)."""
    val, test = structured_batches[:3], structured_batches[3:]
    evaluator = default_volume_evaluator(val_threshold=True)
    for i, batch in enumerate(val):
        evaluator.on_validation_batch_end(None, None, None, batch, i)
    names = [m.name for m in evaluator.val_metrics]
    assert names == ["val_slice_AUROC", "voxel_diceThreshold"]  # the slice AUROC serves checkpoint selection
    choose = evaluator.val_metrics[1]
    threshold = float(choose.compute())
    val_scores, val_labels = pooled_brain_voxels(val)
    assert dice_at_threshold(val_scores, val_labels, threshold) == pytest.approx(
        exact_max_dice(val_scores, val_labels), abs=1e-3
    )
    for i, batch in enumerate(test):
        evaluator.on_test_batch_end(None, None, None, batch, i)
    results = {m.name: float(m.compute()) for m in evaluator.test_metrics}
    test_scores, test_labels = pooled_brain_voxels(test)
    assert results["voxel_valDice"] == pytest.approx(dice_at_threshold(test_scores, test_labels, threshold), abs=1e-12)
    assert results["voxel_valDice"] <= results["voxel_maxDice"] + 1e-3  # max Dice is the upper bound


def test_paper_protocol_differs_where_ranges_differ() -> None:
    """Each volume separates its lesion perfectly, but on different scales: only min-max hides that."""
    lesion_a = _lesion((12, 14, 7), 4) & _brain()
    lesion_b = _lesion((20, 18, 9), 3) & _brain()
    rng = np.random.default_rng(5)
    map_a = 10 + rng.random(SHAPE) + 5 * lesion_a  # normal 10..11, lesion 15..16
    map_b = rng.random(SHAPE) + 2 * lesion_b  # normal 0..1, lesion 2..3: below all of volume a
    batches = [make_batch(0, lesion_a, map_a), make_batch(1, lesion_b, map_b)]
    honest = run(VoxelAUROC(), batches)
    paper = run(PaperVoxelAUROC(), batches)
    assert paper == pytest.approx(1.0)
    assert honest < 0.9
    assert run(PaperMeanDice(), batches) == pytest.approx(1.0)  # each volume at its own best threshold
    assert run(VoxelMaxDice(), batches) < 0.9  # one global threshold cannot do that
    per_volume = run(VoxelPerVolumeMean("auroc"), batches)
    assert per_volume == pytest.approx(1.0)


# --------------------------------------------------------------------------- anomalib integration


def test_evaluator_drives_standard_metrics(structured_batches) -> None:
    metrics = volume_test_metrics(per_volume=True, paper_protocol=True, val_threshold=0.5)
    evaluator = Evaluator(test_metrics=metrics)
    names = [m.name for m in evaluator.test_metrics]
    for expected in (
        "voxel_AUROC",
        "voxel_AUPRC",
        "voxel_maxDice",
        "voxel_valDice",
        "slice_AUROC",
        "slice_AUPRC",
        "volume_AUROC",
        "volume_AUPRC",
        "voxel_AUROC_perVolume",
        "paper_voxel_AUROC",
        "paper_meanDice",
    ):
        assert expected in names
    assert volume_test_metrics(prefix="test_")[0].name == "test_voxel_AUROC"
    for i, batch in enumerate(structured_batches):
        evaluator.on_test_batch_end(None, None, None, batch, i)
    results = {m.name: float(m.compute()) for m in evaluator.test_metrics}

    scores, labels = pooled_brain_voxels(structured_batches)
    assert results["voxel_AUROC"] == pytest.approx(exact_auroc(scores, labels), abs=1e-3)
    # Volume level: one entry per volume (4 lesion, 2 healthy).
    volume_scores = torch.tensor([float(b.volume_score[0]) for b in structured_batches])
    volume_labels = torch.tensor([int(b.volume_label[0]) for b in structured_batches])
    assert results["volume_AUROC"] == pytest.approx(exact_auroc(volume_scores, volume_labels))
    slice_metric = SliceAUROC()
    assert run(slice_metric, structured_batches) == pytest.approx(results["slice_AUROC"])


def test_histogram_states_sum_across_processes(structured_batches) -> None:
    """DDP: counts reduce by sum after the grids of two processes are aligned."""
    single, rank0, rank1 = VoxelAUROC(), VoxelAUROC(), VoxelAUROC()
    assert single._reductions["positives"].__name__ == "dim_zero_sum"
    assert single._reductions["negatives"].__name__ == "dim_zero_sum"
    for batch in structured_batches:
        single.update(batch)
    for batch in structured_batches[:2]:  # low-range volumes on one process
        rank0.update(batch)
    for batch in structured_batches[2:]:  # wider ranges on the other
        rank1.update(batch)
    assert not torch.equal(rank0.grid, rank1.grid)

    summaries = [m.histogram().grid_summary() for m in (rank0, rank1)]

    def summary_tensor(summary):  # noqa: ANN001, ANN202
        return torch.tensor([1, *summary], dtype=torch.long)

    # Process 1 aligns itself first; record its aligned states as the all-gather would see them.
    aligned_rank1 = {}

    def gather_on_rank1(tensor, group=None):  # noqa: ANN001, ANN202
        del group
        if tensor.numel() == 4:
            return [summary_tensor(summaries[0]), tensor]
        for name in ("positives", "negatives", "grid"):
            if getattr(rank1, name) is tensor:
                aligned_rank1[name] = tensor.clone()
        return [tensor]

    rank1._sync_dist(gather_on_rank1)

    def gather_on_rank0(tensor, group=None):  # noqa: ANN001, ANN202
        del group
        if tensor.numel() == 4:
            return [tensor, summary_tensor(summaries[1])]
        name = next(n for n in ("positives", "negatives", "grid") if getattr(rank0, n) is tensor)
        return [tensor, aligned_rank1[name]]

    rank0._sync_dist(gather_on_rank0)
    assert torch.equal(rank0.positives, single.positives)
    assert torch.equal(rank0.negatives, single.negatives)
    assert torch.equal(rank0.grid, single.grid)
    assert float(rank0.compute()) == float(single.compute())


def test_bad_input_is_reported() -> None:
    batch = make_batch(0, _lesion((16, 16, 8), 4) & _brain(), np.zeros(SHAPE))
    wrong_size = SimpleNamespace(gt_mask=batch.gt_mask, anomaly_map=torch.zeros(16, 16, 16))
    with pytest.raises(ValueError, match="does not match gt_mask"):
        VoxelAUROC(fields=["anomaly_map", "gt_mask"]).update(wrong_size)
    with pytest.raises(ValueError, match="needs a threshold"):
        VoxelPerVolumeMean("dice_at_threshold")
    per_volume = VoxelPerVolumeMean("auroc")
    per_volume.update(batch)
    per_volume.update(batch)
    with pytest.raises(ValueError, match="arrived split over several batches"):
        per_volume.compute()
    assert ValidationDiceThreshold().threshold.value != ValidationDiceThreshold().threshold.value  # NaN until run


@pytest.mark.parametrize(("every", "warned"), [(1, False), (3, False), (4, True)])
def test_a_fit_that_skips_validation_after_its_last_epoch_is_warned(every: int, warned: bool, caplog) -> None:  # noqa: ANN001
    """The Dice threshold kept for testing and deployment comes from the last validation run."""
    from simpleslicenet.models.ae3d import AE3D

    model = AE3D()
    model._trainer = SimpleNamespace(datamodule=None, check_val_every_n_epoch=every, max_epochs=6)
    with caplog.at_level("WARNING", logger="simpleslicenet.models.volume_model"):
        model.on_fit_start()
    assert ("epoch 4's model" in caplog.text) is warned
