"""The registration target: nilearn's MNI152 2009 T1 template and its brain mask, on an output grid.

nilearn ships the template in its wheel (197×233×189 voxels of 1 mm, skull-stripped), so it is read
offline. At 1 mm the output grid *is* the template's grid; coarser grids (used by quick runs and tests)
cover the same field of view with fewer, larger voxels, and the template is smoothed before it is
sampled onto them so it does not alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk

from simpleslicenet.data.preprocess.images import image_from_array

__all__ = ["TEMPLATE_SPACE", "Template", "load_template", "template_grid"]

# The BIDS identifier of the template's space: nilearn's template is the asymmetric ICBM152 2009,
# release a (its documentation says so), not fMRIPrep's default release c.
TEMPLATE_SPACE = "MNI152NLin2009aAsym"


@dataclass(frozen=True)
class Template:
    """The template on one grid.

    Args:
        image: T1 intensities (float32), the registration's fixed image.
        brain_mask: Brain mask (uint8, 0/1) on the same grid.
        spacing_mm: Voxel size of the grid.
    """

    image: sitk.Image
    brain_mask: sitk.Image
    spacing_mm: float


@lru_cache(maxsize=1)
def _template_1mm() -> tuple[sitk.Image, sitk.Image]:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=1)
    brain = load_mni152_brain_mask(resolution=1)
    image = image_from_array(np.asarray(template.dataobj, dtype=np.float32), template.affine)
    mask = image_from_array((np.asarray(brain.dataobj) > 0).astype(np.uint8), brain.affine)
    return image, mask


def template_grid(spacing_mm: float) -> sitk.Image:
    """An empty image on the output grid of ``spacing_mm`` voxels over the template's field of view.

    The grid's outer faces coincide with the 1 mm template's, so the brain stays centred at any spacing.

    Raises:
        ValueError: ``spacing_mm`` is not a positive number.
    """
    spacing_mm = float(spacing_mm)
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        msg = f"spacing_mm must be a positive number of millimetres, got {spacing_mm!r}"
        raise ValueError(msg)
    reference, _ = _template_1mm()
    if abs(spacing_mm - 1.0) < 1e-9:
        grid = sitk.Image(reference.GetSize(), sitk.sitkFloat32)
        grid.CopyInformation(reference)
        return grid
    old_spacing = np.asarray(reference.GetSpacing())
    extent = np.asarray(reference.GetSize()) * old_spacing
    size = [max(1, round(float(e) / spacing_mm)) for e in extent]
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    # Shift the first voxel centre so the grid's corner stays where the template's corner is.
    origin = np.asarray(reference.GetOrigin()) + direction @ ((spacing_mm - old_spacing) / 2.0)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


@lru_cache(maxsize=4)
def load_template(spacing_mm: float = 1.0) -> Template:
    """The MNI152 2009 template and brain mask on the ``spacing_mm`` output grid (cached per process).

    Raises:
        ValueError: ``spacing_mm`` is not a positive number.
    """
    grid = template_grid(spacing_mm)
    image, mask = _template_1mm()
    if abs(float(spacing_mm) - 1.0) < 1e-9:
        return Template(image=image, brain_mask=mask, spacing_mm=1.0)
    # Anti-aliasing: a Gaussian of about half the new voxel size before sampling.
    smoothed = sitk.SmoothingRecursiveGaussian(image, float(spacing_mm) / 2.0)
    coarse = sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fraction = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    return Template(image=coarse, brain_mask=sitk.Cast(fraction > 0.5, sitk.sitkUInt8), spacing_mm=float(spacing_mm))
