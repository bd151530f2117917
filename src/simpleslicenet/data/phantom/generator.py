"""One synthetic brain MRI subject: warped MNI152 anatomy, optional lesions, bias field and Rician noise.

Steps, all on the template's voxel grid at the requested spacing:

1. **Anatomy.** A small random affine (rotation, per-axis scaling, shift about the brain's centre)
   plus a smooth non-linear deformation (cubic B-spline on a coarse grid) map every output voxel into
   the template; grey matter, white matter and CSF probabilities are mixed with the subject's tissue
   intensities (partial voluming: intensity = Σ probability × tissue intensity) and sampled there in
   one trilinear pass, together with the brain mask.
2. **Lesions** (lesion subjects only): placed fully inside the brain; their mass effect re-samples the
   neighbouring anatomy pushed radially outward, then core, necrosis and oedema are painted on top.
3. **Scanner.** A smooth multiplicative bias field and Rician noise; zero outside the brain mask
   (skull-stripped, like BraTS).

Every subject is seeded by ``(seed, index)`` alone, and its random choices come from separate streams
(anatomy, intensities, lesions, scanner). So a subject does not depend on how many others are made
or in what order, all contrasts of one subject share its anatomy and lesions, and the lesion subject
``i`` is exactly the healthy subject ``i`` outside its lesions' reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.data.phantom.contrasts import check_contrast, draw_intensities
from simpleslicenet.data.phantom.fields import ControlGrid
from simpleslicenet.data.phantom.lesions import (
    LESION_FAMILIES,
    MASS_EFFECT_REACH,
    LesionOptions,
    check_families,
    lesion_box,
    mass_effect,
    paint_lesion,
    place_lesions,
)
from simpleslicenet.data.phantom.templates import TissueTemplate, load_tissue_template

__all__ = ["PhantomOptions", "PhantomSubject", "generate_subject"]

# White-matter foci are centred where the (warped) template's white-matter probability reaches this.
WHITE_MATTER_PROBABILITY = 0.8


@dataclass(frozen=True)
class PhantomOptions:
    """Everything that shapes a phantom besides its contrast, spacing and seed.

    Args:
        rotation_deg: Largest rotation about each axis.
        scale: Largest relative change of size along each axis.
        translation_mm: Largest shift along each axis.
        deformation_mm: Standard deviation of the non-linear deformation's control displacements.
        deformation_grid_mm: Distance between the deformation's control points.
        bias_strength: Standard deviation of the log bias field's control values.
        bias_grid_mm: Distance between the bias field's control points.
        noise: Range of the Rician noise level, relative to the brightest tissue.
        gain: Range of the per-subject scanner gain.
        intensity_scale: Scanner units of a relative intensity of 1 (images are stored as int16).
        lesions: How lesions are drawn.
    """

    rotation_deg: float = 5.0
    scale: float = 0.08
    translation_mm: float = 4.0
    deformation_mm: float = 4.0
    deformation_grid_mm: float = 24.0
    bias_strength: float = 0.2
    bias_grid_mm: float = 64.0
    noise: tuple[float, float] = (0.015, 0.035)
    gain: tuple[float, float] = (0.8, 1.2)
    intensity_scale: float = 1000.0
    lesions: LesionOptions = field(default_factory=LesionOptions)


@dataclass
class PhantomSubject:
    """A generated subject; arrays are ``(x, y, z)`` on the template grid (RAS).

    Args:
        index: Subject index (with the seed, all that determines it).
        contrast: MRI contrast of ``image``.
        image: Intensities in scanner units, float32, 0 outside the brain.
        seg: Lesion mask (uint8, 1 = oedema, core or necrosis); all zero for a healthy subject.
        brain_mask: Brain mask (uint8).
        affine: Voxel-to-world affine (mm).
        spacing_mm: Voxel size.
        lesions: One manifest entry per lesion (centre, radii, mass effect, voxel count, volume).
        family: Lesion family of a lesion subject (see :data:`~.lesions.LESION_FAMILIES`), else ``None``.
        intensities: Mean intensity of each tissue and lesion compartment.
        noise_std: Standard deviation of the Gaussian components of the Rician noise.
    """

    index: int
    contrast: str
    image: np.ndarray
    seg: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    spacing_mm: float
    lesions: list[dict]
    intensities: dict[str, float]
    noise_std: float
    family: str | None = None

    @property
    def has_lesion(self) -> bool:
        """Whether any voxel is lesion."""
        return bool(self.seg.any())


class _SubjectWarp:
    """Map from output voxel ``p`` to template voxel ``A (p - c) + c + t + v(p)`` (all in voxels)."""

    def __init__(self, template: TissueTemplate, rng: np.random.Generator, options: PhantomOptions) -> None:
        spacing = template.spacing_mm
        angles = rng.uniform(-options.rotation_deg, options.rotation_deg, 3)
        scales = 1.0 + rng.uniform(-options.scale, options.scale, 3)
        self.matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
        self.shift = rng.uniform(-options.translation_mm, options.translation_mm, 3) / spacing
        self.deformation = ControlGrid.random(
            rng,
            template.shape,
            grid_step=options.deformation_grid_mm / spacing,
            std=options.deformation_mm / spacing,
            components=3,
        )
        self.template = template
        self.centre = template.brain_centre
        # Where the template's (cropped) maps sit, and their size, for grid_sample's [-1, 1] units.
        self.offset = np.asarray(template.offset, dtype=np.float64)
        self.extent = np.asarray(template.brain.shape, dtype=np.float64)

    def output_box(self) -> tuple[slice, slice, slice]:
        """Output voxels that can land on the template's maps; everything else is background."""
        margin = self.deformation.bound + 1.0
        lo = self.offset - margin
        hi = self.offset + self.extent - 1 + margin
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        inverse = np.linalg.inv(self.matrix)
        points = (corners - self.centre - self.shift) @ inverse.T + self.centre
        start = np.maximum(np.floor(points.min(axis=0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 2, self.template.shape)
        return tuple(slice(int(a), int(max(a, b))) for a, b in zip(start, stop, strict=True))

    def brain_box(self, step: int) -> tuple[slice, slice, slice]:
        """Output voxels that can hold brain: :meth:`output_box` tightened by a coarse look-up.

        The template's brain mask is sampled on the ``step``-voxel lattice; the box keeps two lattice
        cells of margin around every lattice point that touches brain, far more than the distance from
        any brain voxel to such a point.
        """
        box = self.output_box()
        lattice, positions = self._lattice(box, step)
        brain = torch.from_numpy(self.template.brain)[None, None]
        touched = F.grid_sample(brain, lattice.permute(0, 2, 3, 4, 1), align_corners=True)[0, 0] > 0
        if not touched.any():
            return box
        cells = np.argwhere(touched.numpy())
        lo, hi = cells.min(axis=0) - 2, cells.max(axis=0) + 2
        tight = []
        for axis, where in enumerate(positions):
            start = int(where[max(lo[axis], 0)])
            stop = int(where[min(hi[axis], len(where) - 1)]) + 1
            tight.append(slice(max(start, box[axis].start), min(stop, box[axis].stop)))
        return tuple(tight)

    def _lattice(self, box: tuple[slice, slice, slice], step: int) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Grid coordinates ``[1, 3, cx, cy, cz]`` at the multiples of ``step`` that span the box.

        The lattice is anchored to the whole grid, not to the box, so the warp of a voxel does not
        depend on which box it is computed in.
        """
        positions = [
            np.arange(s.start // step, -(-(s.stop - 1) // step) + 1, dtype=np.float64) * step for s in box
        ]
        deformation = self.deformation.evaluate_at(*positions)
        # Small arrays: numpy, which (unlike torch's thread pool) costs nothing to start on a busy CPU.
        axes = [p - c for p, c in zip(positions, self.centre, strict=True)]
        lattice = np.empty((1, 3, *(len(p) for p in positions)), dtype=np.float32)
        for axis in range(3):
            row = self.matrix[axis]
            constant = self.centre[axis] + self.shift[axis] - self.offset[axis]
            position = (
                (row[0] * axes[0] + constant)[:, None, None]
                + (row[1] * axes[1])[None, :, None]
                + (row[2] * axes[2])[None, None, :]
                + deformation[axis]
            )
            # grid_sample reads (W, H, D) = (z, y, x) coordinates scaled to [-1, 1].
            lattice[0, 2 - axis] = position * (2.0 / (self.extent[axis] - 1.0)) - 1.0
        lattice = torch.from_numpy(lattice)
        return lattice, positions

    def sampling_grid(self, box: tuple[slice, slice, slice], step: int = 1) -> torch.Tensor:
        """``[1, bx, by, bz, 3]`` grid for ``F.grid_sample`` (align_corners=True) over the box.

        With ``step > 1`` the map is computed every ``step`` voxels and upsampled trilinearly: exact
        for the affine part, and the B-spline part is smooth on that scale (at 1 mm and a 4-voxel step
        it moves no voxel by more than 0.15 voxel).
        """
        lattice, positions = self._lattice(box, step)
        if step > 1:
            size = tuple(int(p[-1] - p[0]) + 1 for p in positions)
            lattice = F.interpolate(lattice, size=size, mode="trilinear", align_corners=True)
            crop = tuple(slice(s.start - int(p[0]), s.stop - int(p[0])) for s, p in zip(box, positions, strict=True))
            lattice = lattice[(slice(None), slice(None), *crop)]
        return lattice.permute(0, 2, 3, 4, 1).contiguous()

    def displacement_to_grid(self, displacement: np.ndarray) -> torch.Tensor:
        """Output-space displacement ``[..., 3]`` (voxels, x y z) as a change of grid coordinates."""
        template_shift = displacement @ self.matrix.T.astype(np.float32)
        scaled = template_shift * (2.0 / (self.extent - 1.0)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(scaled[..., ::-1]))


def _local(box: tuple[slice, ...], frame: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """``box ∩ frame`` in global and in frame-local indices, or None when they do not meet."""
    inter = tuple(slice(max(b.start, f.start), min(b.stop, f.stop)) for b, f in zip(box, frame, strict=True))
    if any(s.stop <= s.start for s in inter):
        return None
    return inter, tuple(slice(s.start - f.start, s.stop - f.start) for s, f in zip(inter, frame, strict=True))


def generate_subject(
    index: int,
    lesion: bool = False,
    contrast: str = "t2",
    seed: int = 0,
    spacing_mm: float = 1.0,
    options: PhantomOptions | None = None,
    family: str = "tumour",
) -> PhantomSubject:
    """Generate one subject in memory.

    Args:
        index: Subject index; with ``seed`` it determines the subject completely.
        lesion: Add lesions of ``family``: by default 1–3 tumour-like ones (see
            :class:`~simpleslicenet.data.phantom.lesions.LesionOptions`).
        contrast: ``"t1"``, ``"t1ce"``, ``"t2"`` or ``"flair"``.
        seed: Seed of the whole phantom.
        spacing_mm: Isotropic voxel size; 1.0 is the template's native grid (197×233×189).
        options: Anatomy, scanner and lesion settings (defaults when ``None``); ``options.lesions``
            shapes the ``"tumour"`` family.
        family: One of :data:`~simpleslicenet.data.phantom.lesions.LESION_FAMILIES`.

    Returns:
        The subject's image, lesion mask, brain mask, affine and description.

    Raises:
        ValueError: Unknown contrast or family, or a spacing outside 0.5–8 mm.

    Example:
        >>> from simpleslicenet.data.phantom import generate_subject
        >>> subject = generate_subject(0, lesion=True, contrast="flair", spacing_mm=4.0)
        >>> subject.image.shape, bool(subject.seg.any())
        ((50, 59, 48), True)
    """
    contrast = check_contrast(contrast)
    (family,) = check_families(family)
    kind = LESION_FAMILIES[family]
    options = options or PhantomOptions()
    template = load_tissue_template(spacing_mm)
    shape = template.shape
    streams = np.random.SeedSequence([int(seed), int(index)]).spawn(4)
    anatomy_rng, intensity_rng, lesion_rng, scanner_rng = (np.random.default_rng(s) for s in streams)

    tissue = draw_intensities(intensity_rng, contrast, options.gain, options.intensity_scale)
    warp = _SubjectWarp(template, anatomy_rng, options)
    step = max(1, int(4.0 / template.spacing_mm))  # warp computed every ~4 mm, then interpolated
    box = warp.brain_box(step)
    grid = warp.sampling_grid(box, step)
    # Trilinear sampling is linear, so mixing the tissue maps first and warping once equals warping
    # each map and mixing afterwards, at a third of the cost.
    mixed = tissue.csf * template.csf + tissue.gm * template.gm + tissue.wm * template.wm
    maps = [mixed.astype(np.float32), template.brain]
    if lesion and kind.white_matter:
        maps.append(template.wm.astype(np.float32))  # warped with the anatomy, to place foci in it
    source = torch.from_numpy(np.stack(maps))[None]
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]

    image = np.zeros(shape, dtype=np.float32)
    image[box] = warped[0].numpy()
    brain = np.zeros(shape, dtype=bool)
    brain[box] = warped[1].numpy() >= 0.5
    seg = np.zeros(shape, dtype=bool)
    lesion_entries: list[dict] = []

    if lesion:
        white_matter = None
        if kind.white_matter:
            white_matter = np.zeros(shape, dtype=bool)
            white_matter[box] = warped[2].numpy() >= WHITE_MATTER_PROBABILITY
        lesion_options = options.lesions if family == "tumour" else kind.options
        lesions = place_lesions(lesion_rng, brain, template.spacing_mm, lesion_options, centres_in=white_matter)
        reached = []
        for item in lesions:
            overlap = _local(lesion_box(item.centre, MASS_EFFECT_REACH * item.radius, shape), box)
            if overlap is None:
                continue
            region, local = overlap
            grid[(0, *local)] -= warp.displacement_to_grid(mass_effect(item, region))
            reached.append((region, local))
        # Re-sample after every push is in the grid, so overlapping reaches agree.
        for region, local in reached:
            pushed = F.grid_sample(source[:, :1], grid[(slice(None), *local)], align_corners=True)
            image[region] = pushed[0, 0].numpy()
        for item in lesions:
            painted_box = lesion_box(item.centre, item.radius + 1.0, shape)
            own = paint_lesion(image, item, tissue.as_dict(), painted_box, kind.style) & brain[painted_box]
            seg[painted_box] |= own
            entry = item.describe(template.affine, template.spacing_mm)
            entry["voxels"] = int(own.sum())
            entry["volume_ml"] = round(entry["voxels"] * template.spacing_mm**3 / 1000.0, 4)
            lesion_entries.append(entry)

    bias = ControlGrid.random(scanner_rng, shape, options.bias_grid_mm / template.spacing_mm, options.bias_strength)
    image[box] *= np.exp(bias.evaluate(box)[0])
    noise_std = float(scanner_rng.uniform(*options.noise)) * tissue.brightest_tissue
    signal = image[brain]
    real = signal + np.float32(noise_std) * scanner_rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = np.float32(noise_std) * scanner_rng.standard_normal(signal.shape, dtype=np.float32)
    image[:] = 0.0
    image[brain] = np.sqrt(real * real + imaginary * imaginary)

    return PhantomSubject(
        index=int(index),
        contrast=contrast,
        image=image,
        seg=seg.astype(np.uint8),
        brain_mask=brain.astype(np.uint8),
        affine=template.affine.copy(),
        spacing_mm=template.spacing_mm,
        lesions=lesion_entries,
        intensities=tissue.as_dict(),
        noise_std=round(noise_std, 3),
        family=family if lesion else None,
    )
