"""Conditional normalizing flow of SimpleSliceNet and its per-dimension log-likelihood.

A FrEIA ``SequenceINN`` of ``AllInOneBlock`` couplings maps a feature vector ``x`` (``C`` dims) to
``z`` under a position condition ``c``; with a standard normal base density

    log p(x | c) = -C/2 · log(2π) - |z|² / 2 + log |det ∂z/∂x|,

reported per dimension (divided by ``C``) so that likelihoods of different embedding sizes compare.
The flow always computes in float32, also inside an outer bf16 autocast region (see :mod:`.precision`).

FrEIA builds the blocks (their initialisation, permutations and parameter names); the pass through them
is this module's, the same function as ``AllInOneBlock.forward`` with the subnet's first layer taking the
position code in factored form (:mod:`.conditions`) and the block's constant factors folded into its
small matrices (:func:`_coupling`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn
from torch.nn import functional as F

from .conditions import PositionCodes
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

    def forward(
        self, features: torch.Tensor, conditions: PositionCodes | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z [N, C]`` and ``log|det J| [N]`` of features ``[N, C]`` under their conditions.

        Args:
            features: Flow inputs; another floating type (bf16) is computed in float32.
            conditions: :class:`~.conditions.PositionCodes`, or the conditions row by row ``[N, P]``.
        """
        if not isinstance(conditions, PositionCodes):
            conditions = PositionCodes.of_rows(conditions)
        with full_precision(features.device.type):
            return self.couplings(features.float(), conditions.to(dtype=torch.float32))

    def couplings(self, x: torch.Tensor, conditions: PositionCodes) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks in turn on ``x [N, C]``, in the caller's precision (:meth:`forward` pins float32)."""
        log_jac_det = x.new_zeros(x.shape[0])
        for block in self.inn.module_list:
            x, block_log_jac_det = _coupling(block, x, conditions)
            log_jac_det = log_jac_det + block_log_jac_det
        return x, log_jac_det

    def log_likelihood(self, features: torch.Tensor, conditions: PositionCodes | torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``[N]`` of features ``[N, C]``."""
        z, log_jac_det = self(features, conditions)
        return log_likelihood(z, log_jac_det)


def _coupling(block: AllInOneBlock, x: torch.Tensor, conditions: PositionCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``AllInOneBlock`` forward (affine coupling, global affine, soft permutation) with factored conditions.

    FrEIA's arithmetic with its constant factors moved into the small weight matrices, so that no
    elementwise pass over the rows is spent on them: the subnet output's factor 0.1 into the last layer,
    the global affine ``y·s + o`` into the permutation ``P`` (``(y·s + o)Pᵀ = y(P·s)ᵀ + Po``), and the
    first layer's bias into the code's product.
    """
    passive, active = torch.split(x, block.splits, dim=1)
    first, activation, last = block.subnet
    width = passive.shape[1]
    codes = conditions.project(first.weight[:, width:], first.bias)
    hidden = torch.addmm(codes, passive, first.weight[:, :width].t())
    coefficients = F.linear(activation(hidden), last.weight * 0.1, last.bias * 0.1)
    log_scale, shift = coefficients.split(active.shape[1], dim=1)
    log_scale = block.clamp * torch.tanh(log_scale)
    active = torch.addcmul(shift, active, torch.exp(log_scale))
    scale = block.global_scale_activation(block.global_scale)
    permutation = block.w_perm * scale
    x = F.linear(torch.cat((passive, active), dim=1), permutation, F.linear(block.global_offset, block.w_perm)[0])
    return x, log_scale.sum(dim=1) + torch.log(scale).sum()
