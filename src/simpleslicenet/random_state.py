"""The process's random number generators as plain checkpoint data, so an interrupted training resumes exactly.

Training draws from the global generators of torch (shuffling, noise, feature sampling), NumPy and
Python. A checkpoint that restores the weights and optimiser but not these generators resumes with
other random draws than the uninterrupted run would have made, so the two end with different models.
:func:`capture_random_state` returns their state as tensors, numbers and lists only — loadable with
``torch.load(weights_only=True)`` — and :func:`restore_random_state` puts it back.

Example:
    >>> import torch
    >>> state = capture_random_state()
    >>> first = torch.rand(3)
    >>> restore_random_state(state)
    >>> bool(torch.equal(first, torch.rand(3)))
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_random_state", "restore_random_state", "RANDOM_STATE_FORMAT"]

RANDOM_STATE_FORMAT = "simpleslicenet-random-state-v1"


def capture_random_state() -> dict[str, Any]:
    """State of the torch (CPU and initialised CUDA devices), NumPy and Python global generators."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "format": RANDOM_STATE_FORMAT,
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Put back a state from :func:`capture_random_state`.

    CUDA generators are restored only when the same number of devices is initialised.

    Raises:
        ValueError: ``state`` is not such a state.
    """
    if not isinstance(state, dict) or state.get("format") != RANDOM_STATE_FORMAT:
        msg = "not a random-generator state written by simpleslicenet.random_state"
        raise ValueError(msg)
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gauss"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    cuda = state.get("cuda")
    if (
        cuda is not None
        and torch.cuda.is_available()
        and torch.cuda.is_initialized()
        and len(cuda) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(cuda)
