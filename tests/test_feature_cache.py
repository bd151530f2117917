"""Training at the speed of the arithmetic: the chunked CPU encoder and the training feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_SIMPLESLICENET, tiny_engine
from simpleslicenet.models.simpleslicenet import features as features_module
from simpleslicenet.models.simpleslicenet.feature_cache import FeatureCache
from simpleslicenet.models.simpleslicenet.settings import SimpleSliceNetSettings
from simpleslicenet.models.simpleslicenet.torch_model import SimpleSliceNetModel, TrainingCells


@pytest.fixture(scope="module")
def tiny_model() -> SimpleSliceNetModel:
    torch.manual_seed(0)
    return SimpleSliceNetModel(SimpleSliceNetSettings(**TINY_SIMPLESLICENET)).eval()


def test_cpu_encoder_in_chunks_gives_the_whole_call_features(
    tiny_model: SimpleSliceNetModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    slices = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny_model.encoder(slices)
        calls = []
        original = tiny_model.encoder.embed_slices
        monkeypatch.setattr(tiny_model.encoder, "embed_slices", lambda part: calls.append(len(part)) or original(part))
        # 3 slices of (32 + 2 × padding)² pixels a chunk.
        padded = (32 + 2 * tiny_model.encoder.padding) ** 2
        monkeypatch.setattr(features_module, "CPU_CHUNK_PIXELS", 3 * padded)
        chunked = tiny_model.encoder(slices)
    assert calls == [3, 3, 3, 1]
    # Convolutions of another batch size may sum in another order: float32 rounding, nothing more.
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))


def _cells(rows: int) -> TrainingCells:
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep.view(-1)[:rows] = True
    return TrainingCells(rows=torch.randn(rows, 8), keep=keep, depth=6)


def test_feature_cache_keeps_entries_within_its_bound_and_drops_them_with_a_new_context() -> None:
    first, second = _cells(10), _cells(12)
    cache = FeatureCache(max_bytes=first.nbytes + second.nbytes - 1)
    cache.bind("context A")
    cache.put(("volume", 0), first)
    cache.put(("volume", 1), second)  # over the bound: refused, that volume runs the encoder each epoch
    assert len(cache) == 1 and cache.nbytes == first.nbytes
    kept = cache.get(("volume", 0), "cpu")
    torch.testing.assert_close(kept.rows, first.rows, rtol=0, atol=0)
    assert torch.equal(kept.keep, first.keep) and kept.depth == 6
    assert cache.get(("volume", 1), "cpu") is None
    cache.bind("context A")  # the same context keeps the entries
    assert len(cache) == 1
    cache.bind("context B")  # e.g. other stages or another preprocessing
    assert len(cache) == 0 and cache.nbytes == 0 and cache.get(("volume", 0), "cpu") is None
    with pytest.raises(ValueError, match="bound"):
        FeatureCache(-1)


def _fit(datamodule, root: Path, epochs: int, **kwargs):  # noqa: ANN001, ANN202
    """A tiny SimpleSliceNet fitted with seed 0, how often its encoder ran, and the last validation's metrics."""
    from lightning.pytorch import seed_everything

    from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    from simpleslicenet.models.simpleslicenet.features import SliceFeatureExtractor

    encoded = []
    original = SliceFeatureExtractor.forward

    def counting(self, images):  # noqa: ANN001, ANN202
        encoded.append(images.shape[0])
        return original(self, images)

    seed_everything(0)
    model = SimpleSliceNet(**TINY_SIMPLESLICENET, **kwargs)
    engine = tiny_engine(root, max_epochs=epochs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SliceFeatureExtractor, "forward", counting)
        engine.fit(model, datamodule=datamodule)
    metrics = {name: float(value) for name, value in engine.trainer.callback_metrics.items() if name.startswith("voxel")}
    return model, len(encoded), metrics


def test_cached_features_train_the_same_model_with_the_encoder_run_once_per_volume(
    phantom_datamodule, tmp_path: Path  # noqa: ANN001
) -> None:
    volumes = len(phantom_datamodule.train_data) + len(phantom_datamodule.val_data)
    cached, cached_runs, cached_metrics = _fit(phantom_datamodule, tmp_path / "cached", epochs=3)
    plain, plain_runs, plain_metrics = _fit(phantom_datamodule, tmp_path / "plain", epochs=3, feature_cache_gb=0)
    assert plain_runs == 3 * volumes  # one volume a batch, training and validation
    assert cached_runs == volumes
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(cached.model.state_dict()[name], tensor), name
    assert plain_metrics and cached_metrics == plain_metrics  # the last validation saw the same maps
    assert len(cached.feature_cache) == 0  # freed when the fit ends
