"""Files an EDC fine-tuning run writes: the encoder weights, its resume checkpoint, loss curve and summary.

Every file is written atomically (:mod:`simpleslicenet.atomic`), so an interrupted run leaves either the
previous file or the complete new one. For an output ``encoder.pth`` the run writes, beside it:

* ``encoder.pth`` (or ``.safetensors``): the plain ``state_dict`` of the whole timm model, every tensor
  named as ``timm.create_model(backbone)`` names it, so it loads strictly into that model and into any
  ``features_only`` extractor of it (``backbone_weights="encoder.pth"``);
* ``encoder.edc-checkpoint.pt``: the Lightning checkpoint (encoder, decoder, optimiser, step, loss history)
  to resume from;
* ``encoder_loss.png``: the loss curve (and the encoder's drift from its starting features);
* ``encoder_edc.json``: settings, data, timings and the loss history.

Example:
    >>> from pathlib import Path
    >>> paths = output_paths(Path("runs/encoder.pth"))
    >>> paths["checkpoint"].name, paths["loss_curve"].name
    ('encoder.edc-checkpoint.pt', 'encoder_loss.png')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch

from simpleslicenet.atomic import atomic_path, atomic_write_text
from simpleslicenet.models.backbones import BackboneWeightsError, load_weights_file

__all__ = [
    "WEIGHT_SUFFIXES",
    "check_encoder_weights",
    "output_paths",
    "save_encoder_weights",
    "write_loss_curve",
    "write_summary",
]

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def output_paths(out: Path) -> dict[str, Path]:
    """Where a run with weights file ``out`` puts its checkpoint, loss curve and summary.

    Args:
        out: The encoder weights file (``.pth``, ``.pt`` or ``.safetensors``).

    Raises:
        ValueError: If ``out`` has another suffix.
    """
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        msg = f"{out}: the encoder weights file must end in {', '.join(WEIGHT_SUFFIXES)}"
        raise ValueError(msg)
    return {
        "weights": out,
        "checkpoint": out.with_name(f"{out.stem}.edc-checkpoint.pt"),
        "loss_curve": out.with_name(f"{out.stem}_loss.png"),
        "summary": out.with_name(f"{out.stem}_edc.json"),
    }


def save_encoder_weights(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a plain state dict as ``.pth``/``.pt`` (``torch.save``) or ``.safetensors``.

    Args:
        state: Tensors of the encoder, timm names.
        path: Destination.
        metadata: String metadata stored in a ``.safetensors`` header (a ``.pth`` stays a bare state dict).
    """
    path = Path(path)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        else:
            torch.save(tensors, tmp)
    return path


def check_encoder_weights(path: Path, backbone: str) -> int:
    """Confirm that ``path`` loads into ``timm.create_model(backbone)`` with every key matching (strict).

    The file is read back with :func:`simpleslicenet.models.backbones.load_weights_file`, the loader
    behind every model's ``backbone_weights=``.

    Args:
        path: Weights file.
        backbone: timm model name.

    Returns:
        Number of tensors.

    Raises:
        BackboneWeightsError: If keys are missing, unexpected, or of the wrong shape.
    """
    state = load_weights_file(path)
    own = timm.create_model(backbone, pretrained=False).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [key for key in own if key in state and own[key].shape != state[key].shape]
    if missing or unexpected or wrong:
        msg = (
            f"{path}: does not match {backbone} strictly: {len(missing)} missing (first {missing[:3]}), "
            f"{len(unexpected)} unexpected (first {unexpected[:3]}), {len(wrong)} of the wrong shape (first {wrong[:3]})"
        )
        raise BackboneWeightsError(msg)
    return len(state)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def write_loss_curve(history: Mapping[str, list], path: Path, title: str) -> Path:
    """Plot the training loss per step (with a moving average) and the drift from the starting encoder.

    Args:
        history: ``loss`` per step; ``drift_step`` / ``drift`` where the drift was measured.
        path: PNG destination.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(history.get("loss", []))
    steps = list(range(1, len(losses) + 1))
    has_drift = bool(history.get("drift"))
    fig, axes = plt.subplots(1, 2 if has_drift else 1, figsize=(9 if has_drift else 5, 3.4), squeeze=False)
    ax = axes[0, 0]
    window = max(1, min(50, len(losses) // 10))
    faint = {"lw": 0.6, "alpha": 0.45} if window > 1 else {"lw": 1.2, "marker": "o", "ms": 3}
    ax.plot(steps, losses, color="tab:blue", label="per step", **faint)
    if window > 1:
        ax.plot(steps, _moving_average(losses, window), lw=1.4, color="tab:blue", label=f"mean of {window}")
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (sum over stages of 1 − cos)")
    ax.set_title("encoder–decoder contrast", fontsize=9)
    ax.grid(alpha=0.3)
    if has_drift:
        ax = axes[0, 1]
        ax.plot(history["drift_step"], history["drift"], marker="o", ms=3, color="tab:red")
        ax.set_xlabel("step")
        ax.set_ylabel("1 − cos to the starting features")
        ax.set_title("drift from the initial encoder (eval mode)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_summary(path: Path, summary: Mapping[str, Any]) -> Path:
    """Write the run summary as JSON."""
    return atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")
