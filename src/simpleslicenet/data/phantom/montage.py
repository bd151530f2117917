"""Picture of a phantom: axial slices of a few lesion subjects with the lesion outlined.

Run as a script to (re)make the documentation figure from a freshly generated 1 mm phantom::

    python -m simpleslicenet.data.phantom.montage docs/phantom_montage.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from simpleslicenet.atomic import atomic_path
from simpleslicenet.data.phantom.dataset import generate_phantom_dataset, read_manifest, subject_files

__all__ = ["save_montage"]


def _canonical(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)


def save_montage(
    root: str | os.PathLike,
    path: str | os.PathLike,
    n_subjects: int = 3,
    n_slices: int = 4,
    dpi: int = 110,
) -> Path:
    """Save a PNG grid: one row per lesion subject, axial slices through its lesions, outlines in red.

    Slices are spread over the lesion's axial extent, so every panel shows lesion; images are shown
    in radiological grey scale clipped at the 99.5th percentile of the brain.

    Args:
        root: A phantom folder (see :func:`~simpleslicenet.data.phantom.generate_phantom_dataset`).
        path: Output PNG (written atomically).
        n_subjects: Lesion subjects to show (the first ones in the manifest).
        n_slices: Axial slices per subject.
        dpi: Resolution of the figure.

    Raises:
        ValueError: ``root`` has no phantom manifest or no lesion subject.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, path = Path(root), Path(path)
    manifest = read_manifest(root)
    if manifest is None:
        msg = f"{root}: no phantom manifest (generate the phantom first)"
        raise ValueError(msg)
    contrast = manifest["parameters"]["contrast"]
    chosen = [entry for entry in manifest["subjects"] if entry["label"] == "lesion"][:n_subjects]
    if not chosen:
        msg = f"{root}: the phantom has no lesion subject to show"
        raise ValueError(msg)

    fig, axes = plt.subplots(len(chosen), n_slices, figsize=(2.3 * n_slices, 2.7 * len(chosen)), squeeze=False)
    for row, entry in zip(axes, chosen, strict=True):
        files = subject_files(root, entry["index"], contrast)
        image, seg = _canonical(files["image"]), _canonical(files["seg"]) > 0
        brain = _canonical(files["brainmask"]) > 0
        top = float(np.percentile(image[brain], 99.5)) if brain.any() else float(image.max())
        depths = np.flatnonzero(seg.any(axis=(0, 1)))
        picks = np.linspace(depths.min(), depths.max(), n_slices + 2)[1:-1].round().astype(int)
        xs, ys = np.flatnonzero(brain.any(axis=(1, 2))), np.flatnonzero(brain.any(axis=(0, 2)))
        for ax, z in zip(row, picks, strict=True):
            # Rows of the shown array are y (anterior at the top), columns x; flipped for radiological view.
            view = image[xs.min() : xs.max() + 1, ys.min() : ys.max() + 1, z].T[::-1, ::-1]
            outline = seg[xs.min() : xs.max() + 1, ys.min() : ys.max() + 1, z].T[::-1, ::-1]
            ax.imshow(view, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            if outline.any():
                ax.contour(outline.astype(float), levels=[0.5], colors="red", linewidths=0.9)
            ax.set_title(f"{entry['id']}  z={z}", fontsize=7)
            ax.axis("off")
    fig.suptitle(f"Brain phantom, {contrast.upper()}, {manifest['parameters']['spacing_mm']:g} mm (red: lesion mask)", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Generate a small 1 mm phantom in a temporary folder and save its montage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--contrast", default="t2")
    parser.add_argument("--spacing-mm", type=float, default=1.0)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        root = generate_phantom_dataset(
            folder, n_healthy=0, n_lesion=args.subjects, contrast=args.contrast, seed=args.seed, spacing_mm=args.spacing_mm
        )
        seconds = time.perf_counter() - start
        save_montage(root, args.output, n_subjects=args.subjects)
    per_subject = seconds / args.subjects
    print(f"{args.output}: {args.subjects} subjects at {args.spacing_mm:g} mm ({per_subject:.2f} s each to generate and write)")


if __name__ == "__main__":
    main()
