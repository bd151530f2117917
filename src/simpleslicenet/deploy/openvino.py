"""Exported OpenVINO models: read, checked and compiled without running anything but the graph.

An exported model must carry the package's metadata block as text in its runtime info (written by
:func:`simpleslicenet.models.export.export_openvino`), validated against the one schema
(:func:`simpleslicenet.model_metadata.parse_metadata_json`) with the package's classes only, and its
graph must take one slice stack ``[D, 3, H, W]`` with a dynamic number of slices (the training grid's
slice size) and give an ``anomaly_map``. What it computes is checked at run time by
:func:`simpleslicenet.deploy.loading.check_model_output`.

Example:
    >>> from simpleslicenet.deploy.openvino import load_openvino
    >>> loaded = load_openvino("results/.../weights/openvino/model.xml")  # doctest: +SKIP
    >>> loaded.metadata.preprocessing.target_shape  # doctest: +SKIP
    (96, 96, 48)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from simpleslicenet.deploy.loading import ModelFileError, accept_package_class, check_model_file
from simpleslicenet.model_metadata import METADATA_KEY, ModelMetadata, parse_metadata_json

__all__ = ["OpenVINOModel", "load_openvino", "openvino_core"]


@cache
def openvino_core() -> Any:
    """The process's one OpenVINO ``Core``: every model is read and compiled through it.

    Each ``Core`` loads its own CPU plugin, which gives the loading thread a new alternate signal stack
    and, when it is released, puts back the stack it found and frees its own. Two of them released in the
    order they were made would leave the thread on a freed stack, where the next signal handler (Ctrl-C,
    SIGTERM) crashes the process. The one plugin of the process's one ``Core`` is never released early.
    """
    import numpy as np
    import openvino as ov  # deferred: only this backend needs OpenVINO

    core = ov.Core()
    # OpenVINO's Python layer builds its table of element types and numpy dtypes on first use, in a C++
    # static initialiser that gives up the GIL and takes it back: two threads that use it first at the
    # same moment (two scans in flight in `predict`) deadlock. Build it here, on the loading thread.
    ov.Type.f32.to_dtype()
    ov.Tensor(np.zeros(1, dtype=np.float32), shared_memory=True).data  # noqa: B018 - numpy's side of the table
    return core


@dataclass
class OpenVINOModel:
    """An exported graph, checked and compiled.

    Args:
        compiled: The compiled model.
        output_names: Names of its outputs, in order.
        metadata: Its validated metadata.
    """

    compiled: Any
    output_names: list[str]
    metadata: ModelMetadata


def _check_graph(model: Any, path: Path, metadata: ModelMetadata) -> None:  # noqa: ANN401 - an openvino.Model
    """The graph takes one slice stack ``[D, 3, H, W]`` (any ``D``, the training slice size) and gives a map."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1:
        raise ModelFileError.at(path, f"expected a graph with one input (a slice stack [D, 3, H, W]), it has {len(inputs)}")
    shape = inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic or shape[1].get_length() != 3:
        raise ModelFileError.at(path, f"expected a graph input of shape [D, 3, H, W], it takes {shape}")
    if not shape[0].is_dynamic:
        raise ModelFileError.at(
            path, f"expected a graph with a dynamic number of slices (as exported by this package), it takes {shape}"
        )
    grid = metadata.preprocessing.target_shape if metadata.preprocessing is not None else None
    if grid is not None:
        expected = (grid[1], grid[0])  # the grid is (x, y, z); slices are [H = y, W = x]
        for axis, size in zip((2, 3), expected, strict=True):
            if shape[axis].is_static and shape[axis].get_length() != size:
                raise ModelFileError.at(path, f"graph takes slices of {shape}, but its metadata says the model grid is {grid}")
    if not any("anomaly_map" in output.get_names() for output in outputs):
        names = sorted(name for output in outputs for name in output.get_names())
        raise ModelFileError.at(path, f"graph has no 'anomaly_map' output (its outputs: {names})")


def load_openvino(path: str | os.PathLike, device: str = "CPU", precision: str = "f32", streams: int = 1) -> OpenVINOModel:
    """Read, check and compile an exported model (``model.xml`` beside its ``model.bin``).

    Args:
        path: The ``.xml`` file.
        device: OpenVINO device.
        precision: ``"f32"`` or ``"bf16"``.
        streams: Volumes the compiled model runs at once, each on its share of the cores (``1``: one
            volume on all of them, the shortest time for one scan).

    Raises:
        ModelFileError: Unreadable graph, missing or invalid metadata, a graph that does not take a slice
            stack or gives no anomaly map, or a graph the device cannot compile.
    """
    path = Path(path)
    check_model_file(path)
    core = openvino_core()
    try:
        model = core.read_model(path)
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError and others for damaged files
        raise ModelFileError.at(path, f"not a readable OpenVINO model ({type(error).__name__}: {error})") from error
    if not model.has_rt_info([METADATA_KEY]):
        raise ModelFileError.at(
            path,
            f"not an exported simpleslicenet model (no '{METADATA_KEY}' metadata); export it with "
            "`simpleslicenet export` or `anomalib export` from a simpleslicenet checkpoint",
        )
    try:
        text = model.get_rt_info([METADATA_KEY]).astype(str)
    except Exception as error:  # noqa: BLE001 - a non-text entry raises inside OpenVINO
        raise ModelFileError.at(path, f"invalid simpleslicenet metadata (not text: {error})") from error
    metadata = parse_metadata_json(text, path, accept_package_class)
    _check_graph(model, path, metadata)
    try:
        config = {"INFERENCE_PRECISION_HINT": precision}
        if streams > 1:
            config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
        compiled = core.compile_model(model, device.upper(), config)
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError and others
        raise ModelFileError.at(path, f"cannot compile the model for {device} ({type(error).__name__}: {error})") from error
    output_names = [output.get_any_name() for output in compiled.outputs]
    return OpenVINOModel(compiled=compiled, output_names=output_names, metadata=metadata)
