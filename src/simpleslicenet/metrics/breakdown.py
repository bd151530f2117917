"""Test metrics broken down by lesion family and lesion size, with the evaluator's own metric classes.

A group is a set of lesion volumes (one family of the phantom, or one range of total lesion volume);
every healthy test volume joins every group as the negatives, so a group's ``volume_AUROC`` says how
well its lesion volumes are told apart from healthy ones and its ``voxel_AUPRC`` how well their lesion
voxels stand out against all healthy brain. The Dice threshold is the model's validation threshold.

Example:
    >>> from simpleslicenet.metrics.breakdown import MetricBreakdown
    >>> breakdown = MetricBreakdown()
    >>> engine.test(model, datamodule=datamodule, callbacks=...)  # doctest: +SKIP
    >>> breakdown.results()["family: small"]["volume_AUROC"]  # doctest: +SKIP
"""

from __future__ import annotations

import math

from lightning.pytorch import Callback

from simpleslicenet.metrics.evaluator import volume_test_metrics

__all__ = ["DEFAULT_SIZE_BINS_ML", "MetricBreakdown", "lesion_families", "size_group"]

# Edges of the lesion-size groups: a volume's total lesion volume in millilitres (cm³).
DEFAULT_SIZE_BINS_ML = (2.0, 10.0)
REPORTED = ("voxel_AUROC", "voxel_AUPRC", "voxel_valDice", "lesion_detection", "slice_AUROC", "volume_AUROC")


def size_group(volume_ml: float, edges: tuple[float, ...] = DEFAULT_SIZE_BINS_ML) -> str:
    """Name of the size group of a total lesion volume, e.g. ``"size: 2-10 ml"``."""
    bounds = [0.0, *edges, math.inf]
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        if low <= volume_ml < high:
            return f"size: < {high:g} ml" if low == 0 else f"size: >= {low:g} ml" if high == math.inf else f"size: {low:g}-{high:g} ml"
    msg = f"lesion volume {volume_ml!r} ml is not a non-negative number"
    raise ValueError(msg)


def lesion_families(trainer) -> dict[int, str]:  # noqa: ANN001
    """``{volume index: family}`` of the lesion volumes of the trainer's test data; empty without a family column."""
    samples = getattr(getattr(getattr(trainer, "datamodule", None), "test_data", None), "samples", None)
    if samples is None or "lesion_family" not in samples:
        return {}
    return {
        position: str(family)
        for position, (family, label) in enumerate(zip(samples["lesion_family"], samples["label_index"], strict=True))
        if int(label) == 1
    }


class MetricBreakdown(Callback):
    """Lightning callback: the test metrics of each lesion family and size group.

    Families come from the test samples' ``lesion_family`` column (the phantom has one); sizes from
    each lesion volume's own mask on the model grid.

    Args:
        size_bins_ml: Edges of the size groups in millilitres.
    """

    def __init__(self, size_bins_ml: tuple[float, ...] = DEFAULT_SIZE_BINS_ML) -> None:
        super().__init__()
        self.size_bins_ml = tuple(float(edge) for edge in size_bins_ml)
        self._groups: dict[str, list] = {}
        self._lesion_volumes: dict[str, int] = {}
        self._families: dict[int, str] = {}

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        threshold = getattr(pl_module, "dice_threshold", None)
        self._families = lesion_families(trainer)
        names = [f"family: {family}" for family in sorted(set(self._families.values()))]
        bounds = [0.0, *self.size_bins_ml]
        names += [size_group(low, self.size_bins_ml) for low in bounds]
        self._groups = {name: volume_test_metrics(val_threshold=threshold) for name in names}
        self._lesion_volumes = dict.fromkeys(names, 0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        if outputs is None or outputs.anomaly_map is None or outputs.volume_label is None:
            return
        for index, rows in outputs.volumes():
            part = outputs.rows(rows)
            if int(part.volume_label[0]) == 0:
                targets = list(self._groups)
            else:
                volume_ml = float(part.gt_mask.sum()) * part.geometry[0].voxel_ml
                targets = [size_group(volume_ml, self.size_bins_ml)]
                if index in self._families:
                    targets.append(f"family: {self._families[index]}")
                for name in targets:
                    self._lesion_volumes[name] += 1
            for name in targets:
                for metric in self._groups[name]:
                    metric.update(part)

    def results(self) -> dict[str, dict[str, float]]:
        """``{group: {"lesion_volumes": n, metric: value}}`` for every group with a lesion volume."""
        table = {}
        for name, metrics in self._groups.items():
            count = self._lesion_volumes[name]
            if count == 0:
                continue
            values = {metric.name: float(metric.compute()) for metric in metrics if metric.name in REPORTED}
            table[name] = {"lesion_volumes": count, **values}
        return table

    def table(self) -> str:
        """:meth:`results` as a Markdown table."""
        results = self.results()
        columns = [name for name in REPORTED if any(name in row for row in results.values())]
        lines = ["| group | lesion volumes | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
        for name, row in results.items():
            cells = [f"{row[c]:.3f}" if c in row else "n/a" for c in columns]
            lines.append(f"| {name} | {row['lesion_volumes']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
