"""Shared fixtures: a tiny phantom generated once per test session, and a datamodule on it.

Everything is small enough for a CPU test run: 6 healthy + 4 lesion T2 subjects at 4 mm
(50×59×48 voxels each), served on a 32×32×16 model grid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PHANTOM_KWARGS = {"n_healthy": 6, "n_lesion": 4, "contrast": "t2", "seed": 0, "spacing_mm": 4.0}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny phantom (6 healthy + 4 lesion subjects, T2, 4 mm), generated once."""
    from simpleslicenet.data.phantom import generate_phantom_dataset

    return generate_phantom_dataset(tmp_path_factory.mktemp("phantom"), progress=False, **PHANTOM_KWARGS)


@pytest.fixture(scope="session")
def phantom_datamodule(phantom_root: Path):  # noqa: ANN201
    """A set-up :class:`BrainPhantom` on ``phantom_root`` with a 32×32×16 model grid."""
    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    datamodule = BrainPhantom(root=phantom_root, target_shape=(32, 32, 16), progress=False, **PHANTOM_KWARGS)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule
