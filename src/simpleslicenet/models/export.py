"""OpenVINO export of simpleslicenet models: one volume's slice stack in, raw voxel map out.

The graph takes ``[D, 3, H, W]`` with a dynamic number of slices ``D`` and the training grid's slice
size (a fixed ``H, W`` keeps every feature map's size static in the traced graph; tracing with a dynamic
size specialises the upsampling sizes). It is tagged with the model's metadata block
(:mod:`simpleslicenet.model_metadata`) and written atomically: built in a staging folder, then moved
into place (:func:`simpleslicenet.atomic.staged_directory`), so a failed export never leaves a
half-written model where a good one was. Every model's ``to_openvino`` goes through here, so
``anomalib export`` and ``model.to_openvino`` give the same tagged graph.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from simpleslicenet.atomic import TEMP_PREFIX, staged_directory
from simpleslicenet.data.volume import VolumePreprocessing
from simpleslicenet.model_metadata import METADATA_KEY, ModelMetadata

__all__ = ["export_openvino", "export_slice_size"]


def export_slice_size(
    preprocessing: VolumePreprocessing | None, input_size: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Slice size ``(H, W)`` of the export graph: ``input_size``, else the training grid's."""
    if input_size is not None or preprocessing is None or preprocessing.target_shape is None:
        return input_size
    x, y, _ = preprocessing.target_shape
    return (y, x)  # grid is (x, y, z); slices are [H=y, W=x]


def export_openvino(
    metadata: ModelMetadata,
    export_root: str | Path,
    anomalib_export: Callable[[Path, tuple[int, int] | None], Path],
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Export a model to ``<export_root>/weights/openvino/`` atomically, tagged with its metadata.

    Args:
        metadata: The model's metadata block (its preprocessing also gives the default slice size).
        export_root: Folder that receives ``weights/openvino/``.
        anomalib_export: anomalib's own ``to_openvino`` bound to the model: ``(folder, size) -> xml``.
        input_size: Slice size of the graph; default the training grid's.

    Returns:
        Path of the exported ``.xml``.
    """
    import openvino as ov  # deferred: OpenVINO loads only when a model is exported

    final_dir = Path(export_root) / "weights" / "openvino"
    with staged_directory(final_dir, "export") as staging:
        scratch = staging / f"{TEMP_PREFIX}anomalib"  # anomalib's untagged graph, dropped below
        untagged = anomalib_export(scratch, export_slice_size(metadata.preprocessing, input_size))
        graph = ov.Core().read_model(untagged)
        graph.set_rt_info(metadata.to_json(), [METADATA_KEY])
        ov.save_model(graph, staging / untagged.name, compress_to_fp16=False)
        del graph
        shutil.rmtree(scratch)
    return final_dir / untagged.name
