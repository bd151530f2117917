"""Test metrics by lesion family and lesion size (MetricBreakdown), against the evaluator's own figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PHANTOM_KWARGS, tiny_engine

from simpleslicenet.metrics.breakdown import REPORTED, MetricBreakdown, size_group


def test_size_groups() -> None:
    assert [size_group(v) for v in (0.0, 1.99, 2.0, 9.9, 10.0, 250.0)] == [
        "size: < 2 ml",
        "size: < 2 ml",
        "size: 2-10 ml",
        "size: 2-10 ml",
        "size: >= 10 ml",
        "size: >= 10 ml",
    ]
    with pytest.raises(ValueError, match="not a non-negative number"):
        size_group(-1.0)


@pytest.mark.slow
def test_one_family_group_is_the_whole_test_set(trained_simpleslicenet, phantom_datamodule, tmp_path: Path) -> None:  # noqa: ANN001
    model, _, _ = trained_simpleslicenet
    breakdown = MetricBreakdown()
    (overall,) = tiny_engine(tmp_path, callbacks=[breakdown]).test(model, datamodule=phantom_datamodule)
    results = breakdown.results()
    lesion_volumes = int(phantom_datamodule.test_data.samples["label_index"].sum())
    # The tiny phantom holds tumours only: that group is every test volume, so its metrics are the evaluator's.
    assert results["family: tumour"]["lesion_volumes"] == lesion_volumes
    for name in REPORTED:
        if name in overall:
            assert results["family: tumour"][name] == pytest.approx(float(overall[name]), abs=1e-6), name
    sizes = [row["lesion_volumes"] for group, row in results.items() if group.startswith("size: ")]
    assert sum(sizes) == lesion_volumes
    assert "| family: tumour |" in breakdown.table()


@pytest.mark.slow
def test_families_are_scored_against_all_healthy_volumes(trained_simpleslicenet, tmp_path: Path) -> None:  # noqa: ANN001
    from lightning.pytorch import Callback

    from simpleslicenet.data.datamodules.phantom import BrainPhantom
    from simpleslicenet.metrics.exact import exact_auroc

    model, _, _ = trained_simpleslicenet
    families = ["small", "multifocal", "hypointense"]
    kwargs = {**PHANTOM_KWARGS, "n_lesion": 9}
    datamodule = BrainPhantom(
        root=tmp_path / "data", target_shape=(32, 32, 16), lesion_families=families, progress=False, **kwargs
    )
    datamodule.setup()
    breakdown = MetricBreakdown()
    scores: dict[int, tuple[float, int]] = {}

    class VolumeScores(Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            for index, rows in outputs.volumes():
                scores[index] = (float(outputs.volume_score[rows][0]), int(outputs.volume_label[rows][0]))

    tiny_engine(tmp_path, callbacks=[breakdown, VolumeScores()]).test(model, datamodule=datamodule)
    results = breakdown.results()
    samples = datamodule.test_data.samples
    tested = [family for family in families if (samples["lesion_family"] == family).any()]
    assert len(tested) >= 2  # the validation split takes some lesion volumes
    assert sorted(group for group in results if group.startswith("family: ")) == [f"family: {f}" for f in sorted(tested)]
    families_of = list(samples["lesion_family"])
    for family in tested:
        # A lesion volume whose lesion lies outside the model's slab is healthy on the grid, in every group.
        lesion = [i for i, f in enumerate(families_of) if f == family and scores[i][1] == 1]
        members = lesion + [i for i in scores if scores[i][1] == 0]
        assert results[f"family: {family}"]["lesion_volumes"] == len(lesion)
        expected = exact_auroc(
            torch.tensor([scores[i][0] for i in members]), torch.tensor([scores[i][1] for i in members])
        )
        assert results[f"family: {family}"]["volume_AUROC"] == pytest.approx(expected)
