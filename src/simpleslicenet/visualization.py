"""Writes each test/predict volume's anomaly map as NIfTI in the scan's own space, plus a PNG preview.

anomalib's ``ImageVisualizer`` re-opens ``image_path`` with PIL, which fails on NIfTI scans. Every
simpleslicenet model uses :class:`VolumeMapWriter` in its place: the map of each volume goes to
``<output_dir>/<scan name>_anomaly_map.nii.gz`` (overlay it on the scan in ITK-SNAP or FSLeyes) and a
few slices with the map and the true lesion outline to ``<scan name>.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.visualization import Visualizer

from simpleslicenet.atomic import atomic_path
from simpleslicenet.data.nifti import write_nifti
from simpleslicenet.data.scans import nifti_stem

__all__ = ["VolumeMapWriter"]


def _preview(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, path: Path, n_slices: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = image.shape[0]
    if mask is not None and mask.any():
        area = mask.reshape(depth, -1).sum(1)
        centre = int(area.argmax())
    else:
        centre = int(amap.reshape(depth, -1).max(1).argmax())
    # n_slices distinct slices around the centre, shifted inwards at the volume's ends.
    n_slices = min(n_slices, depth)
    step = max(1, depth // (4 * n_slices))
    first = int(np.clip(centre - step * (n_slices // 2), 0, depth - 1 - step * (n_slices - 1)))
    rows = [first + step * i for i in range(n_slices)]
    fig, axes = plt.subplots(2, n_slices, figsize=(2.2 * n_slices, 4.6), squeeze=False)
    for col, z in enumerate(rows):
        for row in (0, 1):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", origin="lower")
            if row == 1:
                ax.imshow(amap[z], cmap="jet", alpha=0.45, origin="lower", vmin=0, vmax=max(1e-6, amap.max()))
            if mask is not None and mask[z].any():
                ax.contour(mask[z], levels=[0.5], colors="lime", linewidths=0.7, origin="lower")
            ax.set_title(f"slice {z}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


class VolumeMapWriter(Visualizer):
    """Lightning callback writing one NIfTI anomaly map (and a PNG preview) per test/predict volume.

    Args:
        output_dir: Folder for the outputs; default ``<trainer.default_root_dir>/anomaly_maps`` of the
            trainer that runs the test or prediction (so each run writes into its own folder).
        previews: Also write a PNG preview per volume.
    """

    def __init__(self, output_dir: str | Path | None = None, previews: bool = True) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.previews = previews
        self._sources: dict[tuple[Path, str], str] = {}  # (folder, file stem) -> scan it was written for

    def write(self, batch: Any, folder: str | Path | None = None) -> list[Path]:  # noqa: ANN401
        """Write the maps of every volume in a predicted :class:`VolumeBatch`; returns the NIfTI paths.

        Args:
            batch: The predicted batch.
            folder: Where to write; default ``output_dir``.
        """
        folder = Path(folder) if folder is not None else self.output_dir
        if folder is None:
            msg = "VolumeMapWriter.write needs a folder: pass one or set output_dir"
            raise ValueError(msg)
        written = []
        if batch.anomaly_map is None or getattr(batch, "geometry", None) is None:
            return written
        for _volume, rows in batch.volumes():
            geometry = batch.geometry[rows.start]
            if geometry is None:
                continue
            amap = batch.anomaly_map[rows].detach().float().cpu().numpy()
            source = geometry.path or batch.image_path[rows.start]
            stem = nifti_stem(source) or Path(source).stem
            if self._sources.setdefault((folder, stem), source) != source:
                # Two scans of one name (e.g. healthy/001 and lesion/001): keep both maps.
                stem = f"{Path(source).parent.name}_{stem}"
            path = write_nifti(geometry.to_scan(amap), geometry, folder / f"{stem}_anomaly_map.nii.gz", overwrite=True)
            written.append(path)
            if self.previews:
                image = batch.image[rows, 0].detach().float().cpu().numpy()
                mask = batch.gt_mask[rows].cpu().numpy() if batch.gt_mask is not None else None
                _preview(image, amap, mask, folder / f"{stem}.png")
        return written

    def _on_batch_end(self, trainer: Any, outputs: Any) -> None:  # noqa: ANN401
        folder = self.output_dir or Path(trainer.default_root_dir) / "anomaly_maps"
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            self.write(outputs, folder)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del pl_module, batch, batch_idx, dataloader_idx
        self._on_batch_end(trainer, outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del pl_module, batch, batch_idx, dataloader_idx
        self._on_batch_end(trainer, outputs)
