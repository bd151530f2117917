"""Slice-wise baselines: any anomalib image model run on the axial slices of whole volumes.

A :class:`~simpleslicenet.data.batch.VolumeBatch` is just ``D`` images per volume, so an anomalib
image model trains on the slices of healthy volumes unchanged. What a volume needs on top is done
here, in a thin subclass made by :func:`slicewise`:

* **training** sees only the slices that hold brain, every ``train_slice_stride``-th one
  (neighbouring slices are near duplicates, and PatchCore's memory bank grows with every slice);
* **validation / test / predict** keep the wrapped model's per-slice maps and scores; the stacked
  maps of a volume are its raw 3D anomaly map ``[D, H, W]``, scored by the shared step
  (:func:`~simpleslicenet.models.scoring.score_volumes`: brain restriction, slice and volume scores);
* the **pre-processor** only applies ImageNet normalisation (no resize), so maps stay at slice size;
  with ``image_size`` it resizes first, as anomalib's own models do, and maps come out at that size;
* the **visualizer** writes NIfTI maps (:class:`~simpleslicenet.visualization.VolumeMapWriter`):
  anomalib's ``ImageVisualizer`` re-opens ``image_path`` with PIL, which cannot read NIfTI;
* the **evaluator** reports volumetric metrics (:mod:`simpleslicenet.metrics`);
* **offline weights**: timm cannot download here, so the wrapped model is built with
  ``pre_trained=False`` and ImageNet weights bundled with
  :mod:`simpleslicenet.models.backbones` are loaded into its timm feature extractor
  (``backbone_weights="imagenet"``, default backbone ``tf_efficientnet_lite0``). ``"random"`` keeps
  the random initialisation; the choice is kept as the hyper-parameter ``backbone_weights``.

Everything else (losses, optimisers, memory banks and the hooks that fill them, export) is the
wrapped model's own.

Layout: :mod:`.mixin` (what every slice-wise model adds), :mod:`.factory` (``slicewise(Model)`` for
any anomalib image model), and one module per named model (:mod:`.patchcore` with its CPU heap fix,
:mod:`.cflow` with its volume-comparable likelihood map, :mod:`.padim`).

Example:
    >>> from anomalib.engine import Engine
    >>> from simpleslicenet.models.slicewise import PatchcoreSlices, slicewise
    >>> from anomalib.models import Dfkde
    >>> model = PatchcoreSlices(train_slice_stride=3)
    >>> DfkdeSlices = slicewise(Dfkde)  # any anomalib image model
    >>> engine = Engine(accelerator="cpu")
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> predictions = engine.predict(model=model, datamodule=datamodule)  # doctest: +SKIP
"""

from anomalib.models import Fastflow, ReverseDistillation

from simpleslicenet.models.slicewise.cflow import CflowSlices, LikelihoodMapGenerator
from simpleslicenet.models.slicewise.factory import resolve_slicewise, slicewise
from simpleslicenet.models.slicewise.mixin import SliceWiseMixin, load_offline_weights
from simpleslicenet.models.slicewise.padim import PadimSlices
from simpleslicenet.models.slicewise.patchcore import PatchcoreSlices

__all__ = [
    "SliceWiseMixin",
    "slicewise",
    "LikelihoodMapGenerator",
    "load_offline_weights",
    "PatchcoreSlices",
    "CflowSlices",
    "PadimSlices",
    "FastflowSlices",
    "ReverseDistillationSlices",
]

# FastFlow and Reverse Distillation only build for ResNet-style backbones (no bundled weights) and a
# fixed input size: pass backbone_weights="random" and image_size, as their configs do.
FastflowSlices = slicewise(Fastflow)
ReverseDistillationSlices = slicewise(ReverseDistillation)


def __getattr__(name: str) -> type:
    """``<Model>Slices`` for any other anomalib image model, made on first use."""
    return resolve_slicewise(name)
