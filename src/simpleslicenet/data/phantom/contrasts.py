"""Tissue and lesion intensities of each MRI contrast, drawn per subject.

Every value is a relative intensity range; a subject draws one value per range (uniformly) and the
ranges of one contrast never overlap where the contrast's tissue ordering must hold, so the ordering
holds for every subject:

* ``t1``: white matter > grey matter > CSF; lesions are dark (oedema hypointense, core darker).
* ``t1ce``: as ``t1``, with a bright enhancing rim around a dark necrotic centre.
* ``t2``: CSF > grey matter > white matter; oedema bright, necrosis brighter, solid core intermediate.
* ``flair``: CSF dark (suppressed), grey matter slightly brighter than white; oedema brightest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CONTRASTS", "ContrastIntensities", "check_contrast", "draw_intensities"]

# (low, high) per class, relative to the scanner gain.
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t1": {
        "wm": (0.95, 1.05), "gm": (0.58, 0.68), "csf": (0.18, 0.30),
        "oedema": (0.38, 0.48), "core": (0.28, 0.36), "necrosis": (0.16, 0.24),
    },
    "t1ce": {
        "wm": (0.95, 1.05), "gm": (0.58, 0.68), "csf": (0.18, 0.30),
        "oedema": (0.40, 0.50), "core": (1.20, 1.40), "necrosis": (0.14, 0.24),
    },
    "t2": {
        "wm": (0.30, 0.38), "gm": (0.45, 0.55), "csf": (0.92, 1.05),
        "oedema": (0.72, 0.85), "core": (0.58, 0.68), "necrosis": (1.00, 1.15),
    },
    "flair": {
        "wm": (0.45, 0.52), "gm": (0.56, 0.66), "csf": (0.06, 0.12),
        "oedema": (0.95, 1.08), "core": (0.70, 0.82), "necrosis": (0.25, 0.40),
    },
}  # fmt: skip

CONTRASTS: tuple[str, ...] = tuple(_RANGES)
_CLASSES = ("wm", "gm", "csf", "oedema", "core", "necrosis")


@dataclass(frozen=True)
class ContrastIntensities:
    """Mean intensity of each tissue and lesion compartment of one subject, in scanner units."""

    wm: float
    gm: float
    csf: float
    oedema: float
    core: float
    necrosis: float

    def as_dict(self) -> dict[str, float]:
        """Plain ``{class: intensity}`` for the manifest."""
        return {name: round(float(getattr(self, name)), 3) for name in _CLASSES}

    @property
    def brightest_tissue(self) -> float:
        """The highest healthy-tissue intensity (sets the noise level)."""
        return max(self.wm, self.gm, self.csf)


def check_contrast(contrast: str) -> str:
    """Return ``contrast`` in lower case, or raise ``ValueError`` naming the allowed ones."""
    key = str(contrast).lower()
    if key not in _RANGES:
        msg = f"unknown contrast {contrast!r}: allowed contrasts are {', '.join(CONTRASTS)}"
        raise ValueError(msg)
    return key


def draw_intensities(
    rng: np.random.Generator,
    contrast: str,
    gain_range: tuple[float, float],
    scale: float,
) -> ContrastIntensities:
    """One subject's intensities.

    The same number of random draws is taken for every contrast, so a subject's other random
    choices do not depend on its contrast.

    Args:
        rng: The subject's intensity stream.
        contrast: One of :data:`CONTRASTS`.
        gain_range: Range of the per-subject scanner gain (multiplies every intensity).
        scale: Nominal intensity of a relative value of 1 (scanner units).
    """
    ranges = _RANGES[check_contrast(contrast)]
    u = rng.random(len(_CLASSES) + 1)
    gain = scale * (gain_range[0] + u[-1] * (gain_range[1] - gain_range[0]))
    values = {}
    for name, draw in zip(_CLASSES, u, strict=False):
        lo, hi = ranges[name]
        values[name] = gain * (lo + draw * (hi - lo))
    return ContrastIntensities(**values)
