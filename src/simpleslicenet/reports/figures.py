"""The reports' pictures, drawn with matplotlib's object API (no pyplot state) and returned as PNG data URIs.

Arrays are on the model grid ``[D, H, W] = [z, y, x]`` (RAS: axial slices with anterior up and the
subject's right on the right, the neurological view). Maps are coloured inside the brain only, from a
floor upwards with a colour map that grows more opaque as the score rises, so the scan stays visible
under low scores; flagged voxels are outlined in cyan and a known lesion in green.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpleslicenet.data.geometry import brain_bounding_box

__all__ = [
    "OVERLAY_PERCENTILE",
    "calibration_strip",
    "data_uri",
    "map_range",
    "mosaic",
    "mosaic_slices",
    "orthogonal_views",
    "png_file_uri",
    "pp_plot",
    "slice_profile",
    "voxel_spacing",
]

# The overlay shows the brain's highest scores: those at or above this percentile of its voxels.
OVERLAY_PERCENTILE = 90.0
_FLAGGED = "cyan"
_LESION = "lime"
_DPI = 80


def _figure(width: float, height: float):  # noqa: ANN202
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def data_uri(fig, dpi: int = _DPI) -> str:  # noqa: ANN001
    """``data:image/png;base64,...`` of a matplotlib figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_file_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file, so a page embeds it instead of linking it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray:
    """Voxel size in mm along the model grid's ``(x, y, z)`` = ``(W, H, D)`` index axes (ones without an affine)."""
    if affine is None:
        return np.ones(3)
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return np.where(spacing > 0, spacing, 1.0)


def map_range(score_map: np.ndarray, brain: np.ndarray, percentile: float = OVERLAY_PERCENTILE) -> tuple[float, float]:
    """``(floor, top)`` of the overlay: the brain's ``percentile``-th score and its highest."""
    values = score_map[brain] if brain.any() else score_map.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    floor, top = float(np.percentile(values, percentile)), float(values.max())
    return floor, top if top > floor else floor + 1e-6


def _overlay_cmap():  # noqa: ANN202
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = colormaps["hot"](np.linspace(0.15, 1.0, 256))
    colours[:, 3] = np.linspace(0.45, 0.95, 256)  # opacity grows with the score
    return ListedColormap(colours, name="hot_rising")


def _window(image: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    values = image[brain] if brain.any() else image.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1e-6


@dataclass(frozen=True)
class _Overlay:
    """A scan with its map and outlines, drawn alike in every view of a page.

    The grey window, the map's colour range (:func:`map_range`) and the colour map are set once from the
    whole volume, so every panel of the mosaic and of the orthogonal views shares one scale.
    """

    image: np.ndarray
    score_map: np.ndarray
    brain: np.ndarray
    flagged: np.ndarray | None
    lesion: np.ndarray | None
    window: tuple[float, float]
    scale: tuple[float, float]
    cmap: object

    @classmethod
    def of(
        cls, image: np.ndarray, score_map: np.ndarray, brain: np.ndarray, flagged: np.ndarray | None, lesion: np.ndarray | None
    ) -> _Overlay:
        """The arrays with the window, range and colour map set from the whole volume."""
        return cls(image, score_map, brain, flagged, lesion, _window(image, brain), map_range(score_map, brain), _overlay_cmap())

    def panel(self, ax, cut: tuple, aspect: float):  # noqa: ANN001, ANN201
        """One 2D view of the cut ``cut``: the scan in grey, the map above the floor inside the brain, outlines."""
        from matplotlib import patheffects

        image, score, brain = self.image[cut], self.score_map[cut], self.brain[cut]
        ax.imshow(image, cmap="gray", origin="lower", vmin=self.window[0], vmax=self.window[1], aspect=aspect, interpolation="nearest")
        floor, top = self.scale
        shown = np.ma.masked_where(~brain | ~(score > floor), score)  # a constant map shows nothing
        overlay = ax.imshow(shown, cmap=self.cmap, origin="lower", vmin=floor, vmax=top, aspect=aspect, interpolation="nearest")
        for outline, colour in ((self.flagged, _FLAGGED), (self.lesion, _LESION)):
            if outline is None:
                continue
            outline = outline[cut]
            if outline.any() and min(outline.shape) > 1:
                lines = ax.contour(outline.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0, origin="lower")
                # A dark edge keeps the outline visible on the overlay's bright end.
                lines.set_path_effects([patheffects.withStroke(linewidth=2.2, foreground="black")])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        return overlay


def mosaic_slices(brain: np.ndarray, n_slices: int = 12) -> list[int]:
    """Axial slices spread evenly over the brain, from where its area first reaches a tenth of its largest.

    The thin caps at either end (a few voxels of cerebellum or vertex) are left out; an empty mask
    spreads the slices over the whole volume.
    """
    area = np.asarray(brain, dtype=bool).reshape(brain.shape[0], -1).sum(1)
    present = np.flatnonzero(area >= 0.1 * area.max()) if area.max() > 0 else np.arange(brain.shape[0])
    first, last = int(present[0]), int(present[-1])
    if last - first + 1 <= n_slices:
        return list(range(first, last + 1))
    return sorted({int(round(z)) for z in np.linspace(first, last, n_slices)})


def _crop(brain: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    lo, hi = brain_bounding_box(brain)
    return tuple(slice(max(0, int(a) - margin), min(n, int(b) + margin)) for a, b, n in zip(lo, hi, brain.shape, strict=True))


def mosaic(
    image: np.ndarray,
    score_map: np.ndarray,
    brain: np.ndarray,
    flagged: np.ndarray | None,
    lesion: np.ndarray | None,
    spacing: np.ndarray,
    slices: Sequence[int],
    columns: int = 6,
) -> str:
    """Axial mosaic of ``slices`` (cropped to the brain) with the map and outlines; a PNG data URI."""
    layers = _Overlay.of(image, score_map, brain, flagged, lesion)
    _, rows_box, cols_box = _crop(brain)
    rows = max(1, -(-len(slices) // columns))
    height, width = (rows_box.stop - rows_box.start) * spacing[1], (cols_box.stop - cols_box.start) * spacing[0]
    panel = 1.9  # ~150 px a slice at 80 dpi
    fig = _figure(panel * columns + 0.9, panel * rows * max(0.5, min(2.0, height / max(width, 1e-6))) + 0.3)
    grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.08], wspace=0.03, hspace=0.12)
    overlay = None
    for index, z in enumerate(slices):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        overlay = layers.panel(ax, (z, rows_box, cols_box), spacing[1] / spacing[0])
        ax.set_title(f"z = {z}", fontsize=7, pad=2)
    if overlay is not None:
        bar = fig.colorbar(overlay, cax=fig.add_subplot(grid[:, columns]))
        bar.ax.tick_params(labelsize=6)
        bar.set_label("anomaly score", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.95, top=0.93, bottom=0.02)
    return data_uri(fig)


def orthogonal_views(
    image: np.ndarray,
    score_map: np.ndarray,
    brain: np.ndarray,
    flagged: np.ndarray | None,
    lesion: np.ndarray | None,
    spacing: np.ndarray,
    peak: tuple[int, int, int],
) -> str:
    """Axial, coronal and sagittal views through ``peak`` ``(d, h, w)`` with a cross-hair; a PNG data URI."""
    layers = _Overlay.of(image, score_map, brain, flagged, lesion)
    d, h, w = peak
    sx, sy, sz = spacing
    box = _crop(brain)
    views = [  # (title, cut, aspect = row spacing / column spacing, cross-hair (column, row))
        (f"axial z = {d}", (d, box[1], box[2]), sy / sx, (w - box[2].start, h - box[1].start)),
        (f"coronal y = {h}", (box[0], h, box[2]), sz / sx, (w - box[2].start, d - box[0].start)),
        (f"sagittal x = {w}", (box[0], box[1], w), sz / sy, (h - box[1].start, d - box[0].start)),
    ]
    fig = _figure(8.4, 3.2)
    axes = fig.subplots(1, 3)
    for ax, (title, cut, aspect, (column, row)) in zip(axes, views, strict=True):
        layers.panel(ax, cut, aspect)
        ax.axvline(column, color="deepskyblue", linewidth=0.5, alpha=0.7)
        ax.axhline(row, color="deepskyblue", linewidth=0.5, alpha=0.7)
        ax.set_title(title, fontsize=8, pad=2)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.04)
    return data_uri(fig)


def calibration_strip(calibration_scores: Sequence[float], volume_score: float | None) -> str:
    """Histogram of the calibration scans' volume scores with a line at this scan's; a PNG data URI."""
    scores = np.asarray(calibration_scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    fig = _figure(4.4, 1.7)
    ax = fig.add_subplot()
    if scores.size:
        ax.hist(scores, bins=max(5, min(30, scores.size)), color="#9aa7b8", edgecolor="white")
        ax.plot(scores, np.zeros_like(scores), "|", color="#44546a", markersize=8)
    if volume_score is not None and np.isfinite(volume_score):
        ax.axvline(volume_score, color="crimson", linewidth=2, label="this scan")
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    ax.set_xlabel("volume score (calibration scans: healthy)", fontsize=7)
    ax.set_ylabel("scans", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.spines[["top", "right"]].set_visible(False)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.95, bottom=0.27)
    return data_uri(fig)


def slice_profile(slice_scores: Sequence[float], marked: Sequence[int] = ()) -> str:
    """Score of every axial slice (model grid), the mosaic's slices marked; a PNG data URI."""
    scores = np.asarray(slice_scores, dtype=float)
    fig = _figure(4.4, 1.7)
    ax = fig.add_subplot()
    ax.plot(np.arange(scores.size), scores, color="#44546a", linewidth=1)
    marked = [z for z in marked if 0 <= z < scores.size]
    if marked:
        ax.plot(marked, scores[marked], "o", color="crimson", markersize=3, label="in the mosaic")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel("axial slice z (model grid)", fontsize=7)
    ax.set_ylabel("slice score", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.spines[["top", "right"]].set_visible(False)
    fig.subplots_adjust(left=0.14, right=0.98, top=0.95, bottom=0.27)
    return data_uri(fig)


def _expected(n: int) -> np.ndarray:
    return np.arange(1, n + 1) / (n + 1)


def pp_plot(pvalues: Sequence[float], calibration_pvalues: Sequence[float] | None = None) -> str:
    """Sorted volume p-values against the uniform distribution's quantiles (P–P plot); a PNG data URI.

    Healthy scans' p-values lie along the diagonal within the pointwise 95% band of uniform order
    statistics; scans with lesions fall below it on the left. The calibration scans' leave-one-out
    p-values, when given, are drawn for reference.
    """
    from scipy.stats import beta

    p = np.sort(np.asarray([v for v in pvalues if v is not None and np.isfinite(v)], dtype=float))
    fig = _figure(4.2, 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, label="uniform")
    if p.size:
        # The i-th of n sorted uniform p-values is Beta(i, n + 1 - i); the band runs i continuously over x (n + 1).
        x = np.linspace(0.002, 0.998, 200)
        a, b = x * (p.size + 1), (1 - x) * (p.size + 1)
        ax.fill_between(x, beta.ppf(0.025, a, b), beta.ppf(0.975, a, b), color="grey", alpha=0.18, linewidth=0, label="95% band (uniform)")
        ax.plot(_expected(p.size), p, "o", color="crimson", markersize=3.5, label=f"scans ({p.size})")
    if calibration_pvalues is not None:
        c = np.sort(np.asarray([v for v in calibration_pvalues if v is not None and np.isfinite(v)], dtype=float))
        if c.size:
            ax.plot(_expected(c.size), c, "s", mfc="none", color="#44546a", markersize=3.5, label=f"calibration, leave-one-out ({c.size})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected (uniform quantile)", fontsize=8)
    ax.set_ylabel("volume p-value (sorted)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="lower right")  # below the diagonal on the right stays empty
    fig.subplots_adjust(left=0.14, right=0.97, top=0.97, bottom=0.12)
    return data_uri(fig)
