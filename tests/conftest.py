"""Shared fixtures: a tiny phantom generated once per test session, and a datamodule on it.

Everything is small enough for a CPU test run: 6 healthy + 4 lesion T2 subjects at 4 mm
(50×59×48 voxels each), served on a 32×32×16 model grid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# BrainPhantom's arguments; the generator calls the modality its contrast.
PHANTOM_KWARGS = {"n_healthy": 6, "n_lesion": 4, "modality": "t2", "seed": 0, "spacing_mm": 4.0}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny phantom (6 healthy + 4 lesion subjects, T2, 4 mm), generated once."""
    from simpleslicenet.data.phantom import generate_phantom_dataset

    arguments = {("contrast" if key == "modality" else key): value for key, value in PHANTOM_KWARGS.items()}
    return generate_phantom_dataset(tmp_path_factory.mktemp("phantom"), progress=False, **arguments)


@pytest.fixture(scope="session")
def phantom_datamodule(phantom_root: Path):  # noqa: ANN201
    """A set-up :class:`BrainPhantom` on ``phantom_root`` with a 32×32×16 model grid."""
    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    datamodule = BrainPhantom(root=phantom_root, target_shape=(32, 32, 16), progress=False, **PHANTOM_KWARGS)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def load_benchmark(name: str):  # noqa: ANN201
    """The script ``benchmarks/<name>.py`` as a module (registered under ``name``: dataclasses look it up)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Small SimpleSliceNet settings for tests: real offline backbone, short flow, light smoothing.
TINY_SIMPLESLICENET = {"flow_blocks": 2, "smoothing_sigma": 1.0}


def tiny_engine(root: Path, max_epochs: int = 2, **kwargs):  # noqa: ANN201
    """A quiet CPU anomalib Engine writing under ``root``."""
    from anomalib.engine import Engine

    return Engine(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def children_running(pid: int, module: str) -> list:
    """The child processes of ``pid`` that run ``python -m <module>``.

    Imports start short-lived helpers of their own (``ldconfig -p``), before a parent has its signal
    handler in place: a test that waits for "any child" can signal the parent too early.
    """
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        try:
            if module in child.cmdline():
                found.append(child)
        except psutil.Error:  # it ended between the listing and the look
            continue
    return found


@pytest.fixture(scope="session")
def trained_simpleslicenet(phantom_datamodule, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """SimpleSliceNet fitted on the tiny phantom through anomalib's Engine: ``(model, engine, checkpoint)``."""
    from lightning.pytorch import seed_everything

    from simpleslicenet.models.simpleslicenet import SimpleSliceNet

    seed_everything(0)
    model = SimpleSliceNet(**TINY_SIMPLESLICENET)
    engine = tiny_engine(tmp_path_factory.mktemp("simpleslicenet"))
    engine.fit(model, datamodule=phantom_datamodule)
    return model, engine, Path(engine.trainer.checkpoint_callback.best_model_path)
