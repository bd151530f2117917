"""Training losses of SimpleSliceNet on per-dimension log-likelihoods.

Normal features ``x`` and their noised copies ``x + ε`` (``ε ~ N(0, σ²)``, the pseudo-anomalies) both
go through the flow; ``ℓ_n`` and ``ℓ_a`` below are their per-dimension log-likelihoods (see
:func:`~simpleslicenet.models.simpleslicenet.flow.log_likelihood`). Three objectives are available:

* :class:`BoundaryGuidedSemiPushPullLoss` — the paper's loss, after the boundary-guided semi-push-pull
  contrast of BGAD (Yao et al., CVPR 2023): maximum likelihood on normals, normals pulled above a
  normal boundary and pseudo-anomalies pushed below a lower abnormal boundary.
* :class:`TripletLikelihoodLoss` — this package's own: maximum likelihood on normals plus a margin
  between each normal feature and its own noised copy.
* :class:`VectorTripletMarginLoss` — the loss of the authors' final (journal-era) code: maximum
  likelihood on normals plus one triplet margin between whole vectors of log-likelihoods.

``create_loss("bgspp" | "triplet" | "authors_triplet")`` picks one (``SimpleSliceNet(loss=...)``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.choices import check_choice

__all__ = [
    "BoundaryGuidedSemiPushPullLoss",
    "TripletLikelihoodLoss",
    "VectorTripletMarginLoss",
    "LOSSES",
    "abnormal_focal_weights",
    "add_feature_noise",
    "create_loss",
    "maximum_likelihood_loss",
    "normal_boundary",
    "normal_focal_weights",
]


def add_feature_noise(
    features: torch.Tensor, std: float = 0.08, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pseudo-anomalies: ``features + ε`` with ``ε ~ N(0, σ²)`` per element.

    Args:
        features: ``[N, C]``.
        std: ``σ`` in feature units.
        generator: Random generator (``None``: torch's global one).
    """
    noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + noise * std


def maximum_likelihood_loss(log_likelihood: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(w · −log σ(ℓ))``: CFlow's bounded maximum-likelihood term on per-dimension likelihoods."""
    loss = -F.logsigmoid(log_likelihood)
    if weights is not None:
        loss = loss * weights
    return loss.mean()


def normal_boundary(normal_log_likelihood: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """``β``-quantile of the normal log-likelihoods (the value at sorted position ``floor(β·N)``), detached."""
    values = normal_log_likelihood.detach().flatten().sort().values
    index = min(int(values.numel() * beta), values.numel() - 1)
    return values[index]


def normal_focal_weights(
    log_likelihood: torch.Tensor,
    normalizer: float = 10.0,
    gamma: float = 0.5,
    alpha: float = 11.0,
    threshold: float = -0.2,
) -> torch.Tensor:
    """Focal weights that stress unlikely (hard) normals.

    With ``s = ℓ/κ`` and ``p = exp(s)``: ``w = α (1 − p)^γ |log p|`` where ``s <= threshold``, else 1
    (the constants make ``w`` continuous at the threshold). Detached.
    """
    scaled = log_likelihood.detach() / normalizer
    probability = scaled.exp()
    focal = alpha * (1 - probability).pow(gamma) * scaled.abs()
    return torch.where(scaled <= threshold, focal, torch.ones_like(scaled))


def abnormal_focal_weights(
    log_likelihood: torch.Tensor,
    normalizer: float = 10.0,
    gamma: float = 2.0,
    alpha: float = 0.53,
    threshold: float = -1.0,
) -> torch.Tensor:
    """Focal weights that stress likely (hard) pseudo-anomalies.

    With ``s = ℓ/κ`` and ``p = exp(s)``: ``w = α (1 + p)^γ / |log p|`` where ``s > threshold``, else 1.
    Detached.
    """
    scaled = log_likelihood.detach() / normalizer
    probability = scaled.exp()
    focal = alpha * (1 + probability).pow(gamma) / scaled.abs().clamp_min(1e-6)
    return torch.where(scaled > threshold, focal, torch.ones_like(scaled))


class BoundaryGuidedSemiPushPullLoss(nn.Module):
    """Boundary-guided semi-push-pull loss on per-dimension log-likelihoods.

    With the normaliser ``κ``, the normal boundary ``b_n = q_β(ℓ_n) / κ`` (the ``β``-quantile of the
    batch's normal likelihoods, no gradient) and the abnormal boundary ``b_a = b_n − τ``::

        L = mean_i w_i · (−log σ(ℓ_n,i))                                  maximum likelihood
          + λ · mean_{i: ℓ_n,i/κ <= b_n} w_i · (b_n − ℓ_n,i/κ)             pull normals above b_n
          + λ · mean_{j: ℓ_a,j/κ >= b_a} v_j · (ℓ_a,j/κ − b_a)             push pseudo-anomalies below b_a

    ``w`` and ``v`` are :func:`normal_focal_weights` and :func:`abnormal_focal_weights` when ``focal``
    is on, else 1. Only pseudo-anomalies above ``b_a`` are pushed ("semi"), so the normal
    distribution is never pushed apart by easy negatives. An empty term counts as zero.

    Args:
        beta: Quantile of the normal boundary (paper: 0.05).
        margin: ``τ`` between the boundaries (paper: 0.1).
        normalizer: ``κ`` (paper: 10).
        focal: Focal weighting of hard normals and hard pseudo-anomalies.
        contrast_weight: ``λ``.
    """

    def __init__(
        self,
        beta: float = 0.05,
        margin: float = 0.1,
        normalizer: float = 10.0,
        focal: bool = True,
        contrast_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.margin = margin
        self.normalizer = normalizer
        self.focal = focal
        self.contrast_weight = contrast_weight

    def boundaries(self, normal_log_likelihood: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal and abnormal boundaries ``(b_n, b_a)`` on the ``ℓ/κ`` scale."""
        b_normal = normal_boundary(normal_log_likelihood, self.beta) / self.normalizer
        return b_normal, b_normal - self.margin

    def forward(self, normal_log_likelihood: torch.Tensor, noised_log_likelihood: torch.Tensor) -> torch.Tensor:
        """Scalar loss from ``ℓ_n [N]`` and ``ℓ_a [M]``."""
        normal_weights = normal_focal_weights(normal_log_likelihood, self.normalizer) if self.focal else None
        abnormal_weights = abnormal_focal_weights(noised_log_likelihood, self.normalizer) if self.focal else None
        loss = maximum_likelihood_loss(normal_log_likelihood, normal_weights)

        b_normal, b_abnormal = self.boundaries(normal_log_likelihood)
        normal_scaled = normal_log_likelihood / self.normalizer
        abnormal_scaled = noised_log_likelihood / self.normalizer
        pull = b_normal - normal_scaled
        push = abnormal_scaled - b_abnormal
        if normal_weights is not None:
            pull = pull * normal_weights
            push = push * abnormal_weights
        inside_normal = normal_scaled <= b_normal
        inside_abnormal = abnormal_scaled >= b_abnormal
        pull_term = (pull * inside_normal).sum() / inside_normal.sum().clamp_min(1)
        push_term = (push * inside_abnormal).sum() / inside_abnormal.sum().clamp_min(1)
        return loss + self.contrast_weight * (pull_term + push_term)


class TripletLikelihoodLoss(nn.Module):
    """Maximum likelihood plus a margin between each normal feature and its noised copy.

    ``L = mean_i −log σ(ℓ_n,i) + λ · mean_i max(0, m − (ℓ_n,i − ℓ_a,i))``: a normal feature should be
    at least ``m`` nats per dimension more likely than the same feature with noise added. ``ℓ_n`` and
    ``ℓ_a`` must be paired row by row.

    Args:
        margin: ``m`` in per-dimension log-likelihood.
        contrast_weight: ``λ``.
    """

    def __init__(self, margin: float = 0.1, contrast_weight: float = 1.0) -> None:
        super().__init__()
        self.margin = margin
        self.contrast_weight = contrast_weight

    def forward(self, normal_log_likelihood: torch.Tensor, noised_log_likelihood: torch.Tensor) -> torch.Tensor:
        """Scalar loss from paired ``ℓ_n [N]`` and ``ℓ_a [N]``."""
        if normal_log_likelihood.shape != noised_log_likelihood.shape:
            msg = (
                "the triplet loss pairs each normal feature with its noised copy: got "
                f"{tuple(normal_log_likelihood.shape)} and {tuple(noised_log_likelihood.shape)}"
            )
            raise ValueError(msg)
        loss = maximum_likelihood_loss(normal_log_likelihood)
        gap = F.relu(self.margin - (normal_log_likelihood - noised_log_likelihood))
        return loss + self.contrast_weight * gap.mean()


class VectorTripletMarginLoss(nn.Module):
    """The authors' final loss: maximum likelihood plus a triplet margin between whole likelihood vectors.

    ``L = mean_i −log σ(ℓ_n,i) + max(0, ‖ℓ_n − ℓ_n[π]‖₂ − ‖ℓ_n − ℓ_a‖₂ + m)`` for one flow step's vectors
    ``ℓ_n, ℓ_a ∈ R^N`` (the anchor is the normal vector, the positive the same vector in a random order
    ``π``, the negative the noised copy): the normal vector must sit at least ``m`` closer to any
    reordering of itself than to its noised version. Unlike :class:`TripletLikelihoodLoss` the margin is
    one distance between vectors, not a per-feature gap.

    Args:
        margin: ``m`` (the authors' 1.0).
        generator: Random generator of ``π`` (``None``: torch's global one).
    """

    def __init__(self, margin: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.triplet = nn.TripletMarginLoss(margin=margin, p=2)
        self.generator = generator

    def forward(self, normal_log_likelihood: torch.Tensor, noised_log_likelihood: torch.Tensor) -> torch.Tensor:
        """Scalar loss from the step's ``ℓ_n [N]`` and ``ℓ_a [N]``."""
        order = torch.randperm(normal_log_likelihood.numel(), generator=self.generator, device=normal_log_likelihood.device)
        positive = normal_log_likelihood.flatten()[order]
        # Rows of one sample: the distances are taken over the whole vector.
        contrast = self.triplet(normal_log_likelihood.flatten()[None], positive[None], noised_log_likelihood.flatten()[None])
        return maximum_likelihood_loss(normal_log_likelihood) + contrast


# Selectable losses (``SimpleSliceNet(loss=...)``): the paper's, this package's, the authors' final code's.
LOSSES = {
    "bgspp": BoundaryGuidedSemiPushPullLoss,
    "triplet": TripletLikelihoodLoss,
    "authors_triplet": VectorTripletMarginLoss,
}


def create_loss(name: str) -> nn.Module:
    """The loss named ``name`` in :data:`LOSSES`, with its default settings.

    Raises:
        ValueError: Unknown name.
    """
    check_choice("loss", name, LOSSES)
    return LOSSES[name]()
