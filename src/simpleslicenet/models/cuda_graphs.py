"""Replaying a whole inference call as one CUDA graph, for inputs of one fixed shape.

A volume's prediction is a few hundred small kernels (more with EfficientNet's depthwise blocks); on a
fast GPU launching them from Python can cost as much as running them. The models' inference paths
never wait for the device and never make a shape from the data (see
:mod:`simpleslicenet.models.scoring`), so the call can be recorded once and replayed: one launch per
volume.

Example:
    >>> captured = CapturedCall(model.predict_volume, example_slices)  # doctest: +SKIP
    >>> anomaly_map = captured(slices).clone()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CapturedCall"]


class CapturedCall:
    """An inference function of CUDA tensors, captured as a CUDA graph for those tensors' shapes and types.

    Args:
        function: Tensors in, a tensor (or a tuple of tensors) out; must not wait for the device or
            make a shape from the inputs' values.
        examples: Inputs of the shapes, types and device every later call will have.
        warmup: Eager calls before capture (cuDNN picks its algorithms, lazy state is built).

    Raises:
        ValueError: No example, or one that is not a CUDA tensor.

    The outputs live in the graph's own memory and are overwritten by the next call: clone them to keep them.
    """

    def __init__(self, function: Callable[..., Any], *examples: torch.Tensor, warmup: int = 3) -> None:
        if not examples or any(example.device.type != "cuda" for example in examples):
            devices = sorted({str(example.device) for example in examples}) or ["no input"]
            msg = f"CUDA graphs need CUDA tensors, got {', '.join(devices)}"
            raise ValueError(msg)
        self.function = function
        self.static_inputs = tuple(example.detach().clone() for example in examples)
        device = examples[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        # Warm-up on a side stream, as capture requires; no gradients are recorded anywhere here.
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                function(*self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_output = function(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:  # noqa: ANN401 - whatever the function returns
        """Copy ``inputs`` into the captured inputs and replay the graph.

        Raises:
            ValueError: An input's shape, type or device differs from its captured example's.
        """
        if len(inputs) != len(self.static_inputs):
            msg = f"captured for {len(self.static_inputs)} inputs, got {len(inputs)}"
            raise ValueError(msg)
        for given, static in zip(inputs, self.static_inputs, strict=True):
            if (given.shape, given.dtype, given.device) != (static.shape, static.dtype, static.device):
                msg = (
                    f"captured for {tuple(static.shape)} {static.dtype} on {static.device}, "
                    f"got {tuple(given.shape)} {given.dtype} on {given.device}"
                )
                raise ValueError(msg)
            static.copy_(given)
        self.graph.replay()
        return self.static_output
