"""OpenVINO export of simpleslicenet models: one volume's slice stack in, raw voxel map out.

The graph takes ``[D, 3, H, W]`` with a dynamic number of slices ``D`` and the training grid's slice
size (a fixed ``H, W`` keeps every feature map's size static in the traced graph; tracing with a dynamic
size specialises the upsampling sizes). It is tagged with the model's metadata (class, preprocessing,
scoring, validation threshold) and written atomically: built in a staging folder, then moved into
place, so a failed export never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import replace_directory

__all__ = ["export_openvino", "export_slice_size"]


def export_slice_size(model: Any, input_size: tuple[int, int] | None) -> tuple[int, int] | None:  # noqa: ANN401
    """Slice size ``(H, W)`` of the export graph: ``input_size``, else the training grid's."""
    if input_size is not None or model.preprocessing is None or model.preprocessing.target_shape is None:
        return input_size
    x, y, _ = model.preprocessing.target_shape
    return (y, x)  # grid is (x, y, z); slices are [H=y, W=x]


def export_openvino(
    model: Any,  # noqa: ANN401 - a VolumeModelMixin model
    export_root: str | Path,
    anomalib_export: Callable[[Path, tuple[int, int] | None], Path],
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Export ``model`` to ``<export_root>/weights/openvino/model.xml`` atomically.

    Args:
        model: A simpleslicenet model (it provides ``metadata()`` and ``preprocessing``).
        export_root: Folder that receives ``weights/openvino/``.
        anomalib_export: anomalib's own ``to_openvino`` bound to the model: ``(folder, size) -> xml``.
        input_size: Slice size of the graph; default the training grid's.

    Returns:
        Path of the exported ``.xml``.
    """
    import openvino as ov

    from simpleslicenet.models.volume_model import METADATA_KEY

    final_dir = Path(export_root) / "weights" / "openvino"
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=final_dir.parent))
    try:
        staged_xml = anomalib_export(staging, export_slice_size(model, input_size))
        ov_model = ov.Core().read_model(staged_xml)
        ov_model.set_rt_info(json.dumps(model.metadata()), [METADATA_KEY])
        tagged = staging / "tagged"
        tagged.mkdir()
        ov.save_model(ov_model, tagged / staged_xml.name, compress_to_fp16=False)
        replace_directory(tagged, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_dir / staged_xml.name
