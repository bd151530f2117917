"""Lesions: irregular 3-D blobs in four families (tumours, small tumours, MS-like foci, dark lesions).

A lesion is a star-shaped blob around its centre: its boundary radius in direction ``n`` is a nominal
radius shrunk by a smooth random function of ``n`` (a few random plane waves evaluated on the unit
sphere), so the outline is lobulated but never leaves the nominal radius. Nested inside it: a
solid core and, often, a necrotic centre, each with its own outline. The whole lesion (oedema + core
+ necrosis) is the ground-truth mask, like BraTS' "whole tumour".

Before a lesion is painted, its mass effect pushes the surrounding tissue radially outward: tissue
inside the lesion is compressed towards its border and the displacement fades to zero at 2.5 radii.

Besides tumours, :data:`LESION_FAMILIES` names the lesions real cohorts also hold (see
:class:`LesionFamily`): single small tumours of about 1–4 cm³, multifocal white-matter foci of 3–10 mm
(MS-like, one compartment of the contrast's oedema intensity) and hypointense lesions (stroke-like:
the tissue underneath darkened, whatever the contrast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from simpleslicenet.choices import check_choice

__all__ = [
    "LESION_FAMILIES",
    "Lesion",
    "LesionFamily",
    "LesionOptions",
    "check_families",
    "lesion_box",
    "mass_effect",
    "paint_lesion",
    "place_lesions",
]

# Mass effect reaches this many nominal radii from the centre.
MASS_EFFECT_REACH = 2.5


@dataclass(frozen=True)
class LesionOptions:
    """How lesions are drawn.

    Args:
        count: Inclusive range of lesions per lesion subject.
        radius_mm: Range of the nominal (largest) radius of a whole lesion.
        irregularity: Range of the outline's depth of lobulation, as a fraction of the radius.
        core_fraction: Range of the core's radius as a fraction of the lesion's.
        necrosis_probability: Chance that a core has a necrotic centre.
        necrosis_fraction: Range of the necrotic centre's radius as a fraction of the core's.
        push_fraction: Range of the mass effect: displacement of tissue at the lesion border, as a
            fraction of the radius.
        oedema_opacity: Range of how much the oedema hides the tissue underneath (1: fully).
        margin_mm: Smallest distance kept between a lesion's outline and the brain's edge.
    """

    count: tuple[int, int] = (1, 3)
    radius_mm: tuple[float, float] = (5.0, 25.0)
    irregularity: tuple[float, float] = (0.2, 0.5)
    core_fraction: tuple[float, float] = (0.3, 0.6)
    necrosis_probability: float = 0.6
    necrosis_fraction: tuple[float, float] = (0.3, 0.6)
    push_fraction: tuple[float, float] = (0.1, 0.3)
    oedema_opacity: tuple[float, float] = (0.65, 0.9)
    margin_mm: float = 2.0


LESION_STYLES = ("tumour", "focal", "hypointense")


@dataclass(frozen=True)
class LesionFamily:
    """A kind of lesion: how many, how large, where, and how it is painted.

    Args:
        options: Counts, sizes and the other ranges. For ``"hypointense"`` lesions ``oedema_opacity``
            is the share of the tissue's intensity taken away (0.4: 40% darker).
        style: ``"tumour"`` (oedema, core and often necrosis, with the contrast's lesion intensities),
            ``"focal"`` (one compartment of the contrast's oedema intensity: bright in T2 and FLAIR,
            dark in T1) or ``"hypointense"`` (the tissue underneath darkened).
        white_matter: Place centres in white matter only (where its probability is at least 0.8).
    """

    options: LesionOptions
    style: str = "tumour"
    white_matter: bool = False

    def __post_init__(self) -> None:
        check_choice("lesion style", self.style, LESION_STYLES)


LESION_FAMILIES: dict[str, LesionFamily] = {
    "tumour": LesionFamily(LesionOptions()),
    # One lesion of 6-10 mm nominal radius: about 1-4 cm³ once lobulated.
    "small": LesionFamily(LesionOptions(count=(1, 1), radius_mm=(6.0, 10.0), push_fraction=(0.0, 0.1))),
    # 3-10 mm across, several, in white matter, no mass effect.
    "multifocal": LesionFamily(
        LesionOptions(
            count=(4, 10),
            radius_mm=(1.5, 5.0),
            irregularity=(0.1, 0.3),
            necrosis_probability=0.0,
            push_fraction=(0.0, 0.0),
            oedema_opacity=(0.8, 1.0),
            margin_mm=1.0,
        ),
        style="focal",
        white_matter=True,
    ),
    "hypointense": LesionFamily(
        LesionOptions(
            count=(1, 2),
            radius_mm=(6.0, 18.0),
            irregularity=(0.3, 0.6),
            necrosis_probability=0.0,
            push_fraction=(0.0, 0.0),
            oedema_opacity=(0.35, 0.6),
        ),
        style="hypointense",
    ),
}


def check_families(families: object) -> tuple[str, ...]:
    """``families`` as a tuple of known family names; raise ``ValueError`` naming the allowed ones."""
    names = (families,) if isinstance(families, str) else tuple(families)
    unknown = [name for name in names if name not in LESION_FAMILIES]
    if not names or unknown:
        msg = f"unknown lesion families {unknown or names!r}: choose from {', '.join(LESION_FAMILIES)}"
        raise ValueError(msg)
    return tuple(str(name) for name in names)


@dataclass
class _Outline:
    """Smooth random function on the unit sphere with values in [-1, 1]: sum of plane waves."""

    directions: np.ndarray  # [K, 3] unit vectors
    frequencies: np.ndarray  # [K]
    phases: np.ndarray  # [K]
    amplitudes: np.ndarray  # [K], sum of |a| = 1

    @classmethod
    def random(cls, rng: np.random.Generator, waves: int = 6) -> _Outline:
        directions = rng.standard_normal((waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        amplitudes = rng.random(waves) + 0.2
        return cls(
            directions=directions,
            frequencies=rng.uniform(1.5, 4.5, waves),
            phases=rng.uniform(0, 2 * np.pi, waves),
            amplitudes=amplitudes / amplitudes.sum(),
        )

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        """Values at unit vectors ``[..., 3]``."""
        projection = unit @ self.directions.T  # [..., K]
        return np.cos(projection * self.frequencies + self.phases) @ self.amplitudes


@dataclass
class _Texture:
    """Smooth random intensity modulation with zero mean and unit standard deviation (plane waves)."""

    wave_vectors: np.ndarray  # [K, 3] radians per voxel
    phases: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, spacing_mm: float, waves: int = 5) -> _Texture:
        directions = rng.standard_normal((waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelength_mm = rng.uniform(5.0, 15.0, waves)
        return cls(
            wave_vectors=directions * (2 * np.pi * spacing_mm / wavelength_mm)[:, None],
            phases=rng.uniform(0, 2 * np.pi, waves),
        )

    def __call__(self, offsets: np.ndarray) -> np.ndarray:
        waves = np.cos(offsets @ self.wave_vectors.T + self.phases)
        return waves.sum(axis=-1) * np.sqrt(2.0 / len(self.phases))


@dataclass
class Lesion:
    """One lesion, in voxel units of the subject's grid.

    Args:
        centre: Centre ``(x, y, z)`` in voxel coordinates.
        radius: Nominal radius of the whole lesion; no lesion voxel lies farther from the centre.
        core_radius: Nominal radius of the core.
        necrosis_radius: Nominal radius of the necrotic centre (0: none).
        push: Mass-effect displacement of tissue at the lesion border.
        irregularity: Depth of the outline's lobes as a fraction of the radius.
        opacity: How much the oedema hides the tissue underneath.
    """

    centre: np.ndarray
    radius: float
    core_radius: float
    necrosis_radius: float
    push: float
    irregularity: float
    opacity: float
    outline: _Outline
    core_outline: _Outline
    texture: _Texture

    def describe(self, affine: np.ndarray, spacing_mm: float) -> dict:
        """Manifest entry: centre in voxels and in world mm, radii and mass effect in mm."""
        world = affine @ np.append(self.centre, 1.0)
        return {
            "centre_voxel": [round(float(v), 3) for v in self.centre],
            "centre_mm": [round(float(v), 3) for v in world[:3]],
            "radius_mm": round(float(self.radius * spacing_mm), 3),
            "core_radius_mm": round(float(self.core_radius * spacing_mm), 3),
            "necrosis_radius_mm": round(float(self.necrosis_radius * spacing_mm), 3),
            "mass_effect_mm": round(float(self.push * spacing_mm), 3),
        }


def lesion_box(centre: np.ndarray, reach: float, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Voxels within ``reach`` of ``centre`` along every axis, clipped to the grid."""
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi, strict=True))


def _box_offsets(box: tuple[slice, slice, slice], centre: np.ndarray) -> np.ndarray:
    """``[bx, by, bz, 3]`` voxel offsets of a box's voxels from ``centre``."""
    axes = [np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c) for s, c in zip(box, centre, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.stack(grids, axis=-1)


def place_lesions(
    rng: np.random.Generator,
    brain: np.ndarray,
    spacing_mm: float,
    options: LesionOptions,
    centres_in: np.ndarray | None = None,
) -> list[Lesion]:
    """Draw lesions whose whole extent lies inside ``brain``, at least ``margin_mm`` from its edge.

    Distances to the brain's edge come from a distance transform on a ~4 mm copy of the mask; the
    margin is widened by that copy's voxel size so the coarse grid cannot place a lesion too close.

    Args:
        rng: The subject's lesion stream.
        brain: Boolean brain mask of the subject ``(x, y, z)``.
        spacing_mm: Voxel size.
        options: Lesion options.
        centres_in: Boolean mask the centres must lie in (e.g. white matter); ``None``: anywhere.

    Raises:
        ValueError: The brain mask cannot hold even the smallest lesion.
    """
    step = max(1, int(round(4.0 / spacing_mm)))
    coarse = np.pad(brain[::step, ::step, ::step], 1)  # outside the grid counts as outside the brain
    depth_mm = ndimage.distance_transform_edt(coarse)[1:-1, 1:-1, 1:-1] * (step * spacing_mm)
    slack_mm = step * spacing_mm * np.sqrt(3) / 2 + spacing_mm + options.margin_mm
    allowed = depth_mm > 0
    if centres_in is not None:
        allowed &= centres_in[::step, ::step, ::step]
    inside = np.argwhere(allowed)
    depths = depth_mm[tuple(inside.T)]

    lo_count, hi_count = options.count
    count = int(rng.integers(lo_count, hi_count + 1))
    lesions: list[Lesion] = []
    for _ in range(count):
        radius_mm = float(rng.uniform(*options.radius_mm))
        # Draw every random number of a lesion up front so that the stream does not depend on placement.
        irregularity = float(rng.uniform(*options.irregularity))
        core_fraction = float(rng.uniform(*options.core_fraction))
        has_necrosis = bool(rng.random() < options.necrosis_probability)
        necrosis_fraction = float(rng.uniform(*options.necrosis_fraction))
        push_fraction = float(rng.uniform(*options.push_fraction))
        opacity = float(rng.uniform(*options.oedema_opacity))
        outline, core_outline = _Outline.random(rng), _Outline.random(rng)
        texture = _Texture.random(rng, spacing_mm)
        choice = float(rng.random())

        candidates = np.empty((0, 3), dtype=int)
        while radius_mm >= options.radius_mm[0] * 0.999:
            fits = depths >= radius_mm + slack_mm
            candidates = inside[fits]
            apart = [
                np.linalg.norm((candidates * step - other.centre) * spacing_mm, axis=1)
                >= radius_mm + other.radius * spacing_mm
                for other in lesions
            ]
            if apart and np.logical_and.reduce(apart).any():
                candidates = candidates[np.logical_and.reduce(apart)]  # keep lesions apart when there is room
            if len(candidates):
                break
            radius_mm *= 0.9  # no room for this size: shrink it
        if not len(candidates):
            msg = f"the brain mask ({int(brain.sum())} voxels) cannot hold a lesion of {options.radius_mm[0]} mm"
            raise ValueError(msg)
        centre = candidates[min(int(choice * len(candidates)), len(candidates) - 1)] * step
        radius = radius_mm / spacing_mm
        core_radius = core_fraction * radius
        lesions.append(
            Lesion(
                centre=centre.astype(np.float64),
                radius=radius,
                core_radius=core_radius,
                necrosis_radius=necrosis_fraction * core_radius if has_necrosis else 0.0,
                push=push_fraction * radius,
                irregularity=irregularity,
                opacity=opacity,
                outline=outline,
                core_outline=core_outline,
                texture=texture,
            )
        )
    return lesions


def mass_effect(lesion: Lesion, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Displacement ``[bx, by, bz, 3]`` (voxels) that pushes tissue radially away from the lesion.

    The new image at ``p`` shows the tissue found at ``p - u(p)``. ``|u|`` grows linearly from the
    centre to ``push`` at the nominal radius, then falls to zero with zero slope at
    :data:`MASS_EFFECT_REACH` radii. With ``push`` below the radius the map stays one-to-one.
    """
    offsets = _box_offsets(box, lesion.centre)
    distance = np.linalg.norm(offsets, axis=-1)
    radius = np.float32(lesion.radius)
    reach = np.float32(MASS_EFFECT_REACH * lesion.radius)
    inner = distance / radius
    outer = np.clip((reach - distance) / (reach - radius), 0.0, 1.0) ** 2
    profile = np.where(distance < radius, inner, outer)
    scale = np.float32(lesion.push) * profile / np.maximum(distance, np.float32(1e-6))
    return offsets * scale[..., None]


def paint_lesion(
    image: np.ndarray,
    lesion: Lesion,
    intensities: dict[str, float],
    box: tuple[slice, slice, slice],
    style: str = "tumour",
) -> np.ndarray:
    """Paint one lesion into ``image[box]`` in place; return its boolean mask on the box.

    Compartment edges are one voxel wide ramps (partial voluming); the mask is where the whole
    lesion covers at least half a voxel.

    Args:
        image: Subject image (healthy tissue, after the mass effect), modified in place.
        lesion: The lesion.
        intensities: Mean intensity of ``oedema``, ``core`` and ``necrosis``.
        box: Voxels to paint; must contain the lesion's nominal sphere.
        style: See :class:`LesionFamily`; ``"focal"`` and ``"hypointense"`` paint the outline only.
    """
    offsets = _box_offsets(box, lesion.centre)
    distance = np.linalg.norm(offsets, axis=-1)
    unit = offsets / np.maximum(distance, np.float32(1e-6))[..., None]
    texture = lesion.texture(offsets).astype(np.float32)

    lobes = (1.0 + lesion.outline(unit)) / 2.0
    outer = lesion.radius * (1.0 - lesion.irregularity * lobes)
    # Inner compartments follow the lobes of the outline (so they stay inside it) plus lobes of their own.
    core_lobes = (1.0 + lesion.core_outline(unit)) / 2.0
    core = outer * (lesion.core_radius / lesion.radius) * (1.0 - 0.3 * core_lobes)

    def cover(radius: np.ndarray) -> np.ndarray:
        return np.clip(radius - distance + 0.5, 0.0, 1.0).astype(np.float32)

    region = image[box]
    tissue = region.copy()
    w_oedema = cover(outer)
    if style == "hypointense":
        image[box] = tissue * (1.0 - lesion.opacity * (1.0 + 0.06 * texture) * w_oedema)
        return w_oedema >= 0.5
    if style == "focal":
        focus = lesion.opacity * intensities["oedema"] * (1.0 + 0.06 * texture) + (1.0 - lesion.opacity) * tissue
        image[box] = tissue * (1.0 - w_oedema) + focus * w_oedema
        return w_oedema >= 0.5
    oedema = lesion.opacity * intensities["oedema"] * (1.0 + 0.06 * texture) + (1.0 - lesion.opacity) * tissue
    region = tissue * (1.0 - w_oedema) + oedema * w_oedema
    w_core = cover(core)
    region = region * (1.0 - w_core) + intensities["core"] * (1.0 + 0.12 * texture) * w_core
    if lesion.necrosis_radius > 0:
        w_necrosis = cover(core * (lesion.necrosis_radius / lesion.core_radius))
        region = region * (1.0 - w_necrosis) + intensities["necrosis"] * (1.0 - 0.05 * texture) * w_necrosis
    image[box] = region
    return (w_oedema >= 0.5) | (w_core >= 0.5)
