"""The authors' settings, each selectable by name: what each changes, and that it changes nothing else."""

from __future__ import annotations

import pytest
import torch

from simpleslicenet.models.simpleslicenet.loss import (
    LOSSES,
    TripletLikelihoodLoss,
    VectorTripletMarginLoss,
    create_loss,
    maximum_likelihood_loss,
)


def test_authors_triplet_is_one_margin_between_whole_vectors() -> None:
    normal = torch.randn(512, generator=torch.Generator().manual_seed(0)) - 1.0
    noised = normal - 0.3
    loss = VectorTripletMarginLoss(generator=torch.Generator().manual_seed(5))(normal, noised)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(5))
    to_positive = torch.linalg.vector_norm(normal - normal[order] + 1e-6)
    to_negative = torch.linalg.vector_norm(normal - noised + 1e-6)
    expected = maximum_likelihood_loss(normal) + torch.clamp(to_positive - to_negative + 1.0, min=0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_authors_triplet_contrast_vanishes_once_the_noised_vector_is_far_enough() -> None:
    normal = torch.full((256,), -1.0) + 0.01 * torch.randn(256, generator=torch.Generator().manual_seed(1))
    far = normal - 10.0  # distance 160 ≫ the shuffle's ~0.16 + margin 1
    near = normal - 0.01
    authors = VectorTripletMarginLoss(generator=torch.Generator().manual_seed(2))
    assert authors(normal, far) == pytest.approx(float(maximum_likelihood_loss(normal)), abs=1e-6)
    assert authors(normal, near) > maximum_likelihood_loss(normal) + 0.5


def test_every_loss_is_selectable_by_name_and_the_names_are_distinct_methods() -> None:
    assert set(LOSSES) == {"bgspp", "triplet", "authors_triplet"}
    assert isinstance(create_loss("authors_triplet"), VectorTripletMarginLoss)
    assert isinstance(create_loss("triplet"), TripletLikelihoodLoss)
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        create_loss("focal")
    normal = torch.randn(64, generator=torch.Generator().manual_seed(3)) - 1
    noised = normal - 0.05
    values = {name: float(create_loss(name)(normal, noised)) for name in LOSSES}
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_fixed_crop_takes_the_authors_slab_and_scales_after_cropping(tmp_path) -> None:  # noqa: ANN001
    import nibabel as nib
    import numpy as np

    from simpleslicenet.data.volume import VolumePreprocessing, load_volume

    shape = (40, 44, 50)  # a small stand-in for the MNI grid
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    head = np.where(((x - 20) / 16) ** 2 + ((y - 22) / 18) ** 2 + ((z - 30) / 16) ** 2 < 1, 100 + z, 0).astype(np.float32)
    path = tmp_path / "mni.nii.gz"
    nib.save(nib.Nifti1Image(head, np.eye(4)), path)
    grid = (32, 32, 16)
    by_brain = load_volume(path, VolumePreprocessing(target_shape=grid, intensity="minmax"))
    slab = load_volume(path, VolumePreprocessing(target_shape=grid, intensity="minmax_crop", crop="fixed", first_slice=6))
    assert slab.geometry.crop_start == (4, 6, 6)  # in-plane centre of the array, axial slices 6..21
    assert by_brain.geometry.crop_start != slab.geometry.crop_start
    # Min–max over the box: its own brightest voxel (slice 21, value 121) becomes 1.
    box = head[4:36, 6:38, 6:22]
    np.testing.assert_allclose(slab.image, box / box.max(), rtol=1e-6)
    # The default settings are unchanged by the new fields.
    assert VolumePreprocessing().crop == "brain" and by_brain.image.max() < 1.0 + 1e-6


def test_checkpoint_selection_keeps_the_best_validation_slice_auroc(phantom_datamodule, tmp_path) -> None:  # noqa: ANN001
    from lightning.pytorch import Callback, seed_everything

    from conftest import TINY_SIMPLESLICENET, tiny_engine
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    from simpleslicenet.training.selection import MONITOR, ValidationSliceAUROCCheckpoint

    class Record(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            del pl_module
            self.values.append(float(trainer.callback_metrics[MONITOR]))

    seed_everything(0)
    selection, record = ValidationSliceAUROCCheckpoint(every_n_epochs=1), Record()
    engine = tiny_engine(tmp_path, max_epochs=3, callbacks=[record, selection])
    engine.fit(SimpleSliceNet(**TINY_SIMPLESLICENET), datamodule=phantom_datamodule)
    assert len(record.values) == 3
    assert float(selection.best_model_score) == pytest.approx(max(record.values))
    assert f"selected-{record.values.index(max(record.values))}" in selection.best_model_path


def test_tables_name_the_optimistic_protocol() -> None:
    from simpleslicenet.benchmark.report import results_frame

    frame = results_frame([
        {"label": "SimpleSliceNet", "dataset": "phantom", "select_checkpoint": {"every_n_epochs": 6}, "metrics": {}},
        {"label": "AE3D", "dataset": "phantom", "metrics": {}},
    ])
    assert list(frame["label"]) == ["SimpleSliceNet [val-selected (authors' protocol, optimistic)]", "AE3D"]
