"""Where SimpleSliceNet may compute in bfloat16, and where it must not.

* The **slice encoder** (backbone and feature pooling) may run under bf16 autocast
  (``precision="bf16"``): that is where nearly all the arithmetic is, and its features move the map by
  about 1% (relative to the map's maximum).
* The **flow and the map** always run in float32, also when an outer autocast region is active (a
  ``torch.autocast`` around the whole model, or Lightning's ``precision="bf16-mixed"``). The map is
  ``1 − exp(ℓ − max ℓ)`` of per-dimension log-likelihoods that sum squares over hundreds of feature
  dimensions through eight coupling blocks; in bf16 those sums lose the digits the map is made of.
* **Exported graphs are float32**: autocast is never traced into an ONNX/OpenVINO export (OpenVINO
  picks its own inference precision, see ``simpleslicenet predict --precision``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["PRECISIONS", "check_precision", "encoder_autocast", "full_precision", "is_exporting"]

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """The precision name, checked.

    Args:
        precision: ``"fp32"`` or ``"bf16"``.

    Raises:
        ValueError: Any other value.
    """
    if precision not in PRECISIONS:
        msg = f"precision must be one of {PRECISIONS}, got {precision!r}"
        raise ValueError(msg)
    return precision


def is_exporting() -> bool:
    """Whether the model is being traced for an ONNX / ``torch.export`` graph."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def encoder_autocast(device_type: str, precision: str) -> AbstractContextManager:
    """bf16 autocast for the slice encoder when ``precision`` is ``"bf16"`` (never while exporting).

    Args:
        device_type: ``"cuda"``, ``"cpu"`` … of the input.
        precision: ``"fp32"`` or ``"bf16"``.
    """
    if precision == "bf16" and not is_exporting():
        # No cast-weight cache: each weight is used once per call, and a cache would not survive
        # CUDA-graph capture (PyTorch's advice for autocast inside captured regions).
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def full_precision(device_type: str) -> AbstractContextManager:
    """Switch an active autocast region off (float32 inside); a no-op when none is active.

    Args:
        device_type: ``"cuda"``, ``"cpu"`` … of the tensors computed inside.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()
