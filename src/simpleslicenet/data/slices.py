"""A volume as the models see it: the stack of its axial slices.

The datamodules' batches and the deployed inferencer build their model input with these two functions,
so a scan reaches a model in the same layout whether it is trained on, tested or deployed. This module
needs torch but not anomalib, so deployment can use it without importing anomalib.
"""

from __future__ import annotations

import numpy as np
import torch

from simpleslicenet.data.geometry import to_slices

__all__ = ["IMAGE_CHANNELS", "slice_stack", "slice_masks"]

# anomalib's image models and their validators take RGB slices; a grey scan fills all three alike.
IMAGE_CHANNELS = 3


def slice_stack(volume: np.ndarray) -> torch.Tensor:
    """The model input of a canonical ``(x, y, z)`` volume: its axial slices ``[D, 3, H, W]``.

    The grey values are held once, as ``[D, 1, H, W]``; the three channels are a view of that one channel
    (stride 0), so a cached volume costs a third of a repeated copy. The first operation that computes
    on it (the pre-processor's normalisation, a concatenation of volumes) makes the three-channel tensor.

    Args:
        volume: Canonical array in ``[0, 1]``.
    """
    grey = torch.from_numpy(to_slices(volume)).unsqueeze(1)
    return grey.expand(-1, IMAGE_CHANNELS, -1, -1)


def slice_masks(mask: np.ndarray) -> torch.Tensor:
    """A canonical ``(x, y, z)`` mask as the boolean ``[D, H, W]`` of its axial slices."""
    return torch.from_numpy(to_slices(mask)).bool()
