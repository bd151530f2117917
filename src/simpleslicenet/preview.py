"""A PNG a reader can use: the slices that matter, a colour scale that starts inside the brain, outlines.

Columns are axial slices chosen by what they show (:func:`choose_slices`): where the true lesion is
largest (when a mask is known), where the map peaks, then the next peaks elsewhere in the volume. The top
row is the scan; the bottom row overlays the map inside the brain only, coloured from the brain's lowest
to its highest score (a colour bar gives the units), with the flagged region's contour (threshold or FDR
mask) in red against the true lesion outline in green. Imports matplotlib only when drawing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simpleslicenet.atomic import atomic_path

__all__ = ["choose_slices", "draw_preview"]


def choose_slices(
    anomaly_map: np.ndarray,
    brain: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    n_slices: int = 4,
) -> list[tuple[int, str]]:
    """``(slice, why)`` pairs in display order: the lesion's largest slice, the map's peak, further peaks.

    Further peaks are the highest slices at least ``depth / (2 n_slices)`` away from those already chosen.

    Args:
        anomaly_map: Map ``[D, H, W]``.
        brain: Brain mask (peaks are sought inside it); ``None``: everywhere.
        lesion: True lesion mask, if known.
        n_slices: Number of slices.
    """
    depth = anomaly_map.shape[0]
    inside = np.ones(anomaly_map.shape, dtype=bool) if brain is None else np.asarray(brain, dtype=bool)
    peaks = np.where(inside, anomaly_map, -np.inf).reshape(depth, -1).max(1)
    peaks = np.where(np.isfinite(peaks), peaks, -np.inf)
    order = [int(z) for z in np.argsort(-peaks, kind="stable")]
    n_slices = min(n_slices, depth)
    chosen: dict[int, str] = {}
    if lesion is not None and np.any(lesion):
        chosen[int(np.asarray(lesion).reshape(depth, -1).sum(1).argmax())] = "lesion largest"
    chosen[order[0]] = "lesion largest, map peak" if order[0] in chosen else "map peak"
    gap = max(1, depth // (2 * n_slices))
    for spaced in (True, False):  # peaks away from the chosen slices first; any slice if the volume is thin
        for z in order:
            if len(chosen) >= n_slices:
                break
            if z not in chosen and (not spaced or all(abs(z - c) >= gap for c in chosen)):
                chosen[z] = "next peak"
    return sorted(chosen.items())


def draw_preview(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    path: str | Path,
    brain: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    flagged: np.ndarray | None = None,
    title: str | None = None,
    n_slices: int = 4,
) -> list[int]:
    """Write the preview PNG of one volume (all arrays ``[D, H, W]`` on one grid); returns the slices shown.

    Args:
        image: The scan on the model grid.
        anomaly_map: Its map.
        path: PNG to write (atomically).
        brain: Brain mask: the overlay and its colour scale cover the brain only.
        lesion: True lesion mask (green outline), if known.
        flagged: Flagged voxels (red contour), e.g. the threshold or FDR mask.
        title: Figure title, e.g. the scan name and its scores.
        n_slices: Number of slices shown.
    """
    from matplotlib.figure import Figure

    inside = np.ones(anomaly_map.shape, dtype=bool) if brain is None else np.asarray(brain, dtype=bool)
    values = anomaly_map[inside] if inside.any() else anomaly_map.ravel()
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1e-6
    chosen = choose_slices(anomaly_map, inside, lesion, n_slices)
    # A figure of its own, not pyplot's: previews are drawn on writer threads, and pyplot's figure
    # registry is not thread-safe. Without tick objects (the axes are hidden anyway) and with light PNG
    # compression the same pixels take about 0.6x the CPU time.
    fig = Figure(figsize=(2.3 * len(chosen) + 0.8, 5.0))
    axes = fig.subplots(2, len(chosen), squeeze=False, subplot_kw={"xticks": [], "yticks": []})
    overlay = None
    for col, (z, why) in enumerate(chosen):
        for row in (0, 1):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", origin="lower")
            if row == 1:
                shown = np.ma.masked_where(~inside[z], anomaly_map[z])
                overlay = ax.imshow(shown, cmap="inferno", alpha=0.6, origin="lower", vmin=low, vmax=high)
                if flagged is not None and np.any(flagged[z]):
                    ax.contour(np.asarray(flagged[z], dtype=float), levels=[0.5], colors="red", linewidths=0.8, origin="lower")
            if lesion is not None and np.any(lesion[z]):
                ax.contour(np.asarray(lesion[z], dtype=float), levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
            ax.set_title(f"slice {z}: {why}" if row == 0 else f"slice {z}", fontsize=7)
            ax.axis("off")
    if overlay is not None:
        bar = fig.colorbar(overlay, ax=axes[1, :].tolist(), fraction=0.025, pad=0.01)
        bar.set_label("anomaly score (brain)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    legend = "green: true lesion" if lesion is not None else ""
    legend += ("; " if legend else "") + "red: flagged" if flagged is not None else ""
    fig.suptitle(" — ".join(part for part in (title, legend) if part), fontsize=8)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=90, format="png", pil_kwargs={"compress_level": 1})
    return [z for z, _ in chosen]
