"""Conditional normalizing flow of SimpleSliceNet and its per-dimension log-likelihood.

A FrEIA ``SequenceINN`` of ``AllInOneBlock`` couplings maps a feature vector ``x`` (``C`` dims) to
``z`` under a position condition ``c``; with a standard normal base density

    log p(x | c) = -C/2 · log(2π) - |z|² / 2 + log |det ∂z/∂x|,

reported per dimension (divided by ``C``) so that likelihoods of different embedding sizes compare.
The flow always computes in float32, also inside an outer bf16 autocast region (see :mod:`.precision`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from .precision import full_precision

__all__ = ["ConditionalFlow", "log_likelihood", "subnet_linear_relu"]

# -0.5·log(2π): the standard normal's log-density constant per dimension.
LOG_NORMAL_CONSTANT = -0.5 * math.log(2 * math.pi)


def subnet_linear_relu(in_features: int, out_features: int) -> nn.Sequential:
    """Coupling subnet Linear → ReLU → Linear with a hidden width equal to its input width."""
    return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, out_features))


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-dimension log-likelihood ``(-C/2·log 2π - |z|²/2 + log|det J|) / C`` of each row of ``z [N, C]``."""
    dims = z.shape[1]
    return LOG_NORMAL_CONSTANT + (-0.5 * z.pow(2).sum(dim=1) + log_jac_det) / dims


class ConditionalFlow(nn.Module):
    """Stack of conditional ``AllInOneBlock`` couplings over ``[N, C]`` features.

    Args:
        dims: Feature size ``C``.
        condition_dims: Size of the condition vector.
        blocks: Number of coupling blocks (paper: 8).
        clamp: Soft clamping of the affine scales (paper: 1.9).
        permute_soft: Random orthogonal mixing between blocks instead of a channel permutation (paper: on).
    """

    def __init__(
        self,
        dims: int,
        condition_dims: int,
        blocks: int = 8,
        clamp: float = 1.9,
        permute_soft: bool = True,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.condition_dims = condition_dims
        # FrEIA draws its permutations from NumPy's global generator; seed it from torch's so a model
        # built after torch.manual_seed is reproducible, and leave NumPy's state as it was.
        numpy_state = np.random.get_state()
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        try:
            self.inn = SequenceINN(dims)
            for _ in range(blocks):
                self.inn.append(
                    AllInOneBlock,
                    cond=0,
                    cond_shape=(condition_dims,),
                    subnet_constructor=subnet_linear_relu,
                    affine_clamping=clamp,
                    global_affine_type="SOFTPLUS",
                    permute_soft=permute_soft,
                )
        finally:
            np.random.set_state(numpy_state)

    def forward(self, features: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z [N, C]`` and ``log|det J| [N]`` of features ``[N, C]`` under conditions ``[N, P]``.

        Inputs of another floating type (bf16 features) are computed in float32.
        """
        with full_precision(features.device.type):
            z, log_jac_det = self.inn(features.float(), c=[conditions.float()])
        return z, log_jac_det

    def log_likelihood(self, features: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``[N]`` of features ``[N, C]``."""
        z, log_jac_det = self(features, conditions)
        return log_likelihood(z, log_jac_det)
