"""Sweep report: a CSV row per run, a markdown table (mean ± std over seeds), PNG plots, and one HTML page of it all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simpleslicenet.atomic import atomic_path, atomic_write_text
from simpleslicenet.metrics.calibrated import FOUND_IN_FAMILY, ks_uniform
from simpleslicenet.reports import Cell, ReportSection, Table, render_sweep_report
from simpleslicenet.training.selection import PROTOCOL_LABEL

__all__ = [
    "CALIBRATED_COLUMNS",
    "TABLE_COLUMNS",
    "breakdown_frame",
    "calibration_cells",
    "calibration_check",
    "report_sections",
    "results_frame",
    "summary_cells",
    "summary_table",
    "write_report",
]

# (column in the results frame, header in the table, digits)
TABLE_COLUMNS = [
    ("voxel_AUPRC", "voxel AUPRC", 3),
    ("voxel_AUROC", "voxel AUROC", 3),
    ("voxel_valDice", "Dice @ val thr.", 3),
    ("voxel_maxDice", "max Dice (upper bound)", 3),
    ("slice_AUROC", "slice AUROC", 3),
    ("volume_AUROC", "volume AUROC", 3),
    ("lesion_detection", "lesions ≥ 1 ml found", 2),
    ("lesion_FPclusters", "false clusters / healthy vol.", 2),
    ("inference_seconds_per_volume", "infer s/vol", 3),
    ("fit_seconds", "fit s", 0),
    ("peak_ram_mb", "peak RAM MB", 0),
    ("parameters_m", "params M", 2),
]
# Label-free outputs (simpleslicenet.metrics.calibrated), beside the Dice that needs labelled validation scans.
CALIBRATED_COLUMNS = [
    ("voxel_valDice", "Dice @ val thr.", 3),
    ("fdr05_Dice", "Dice @ FDR 0.05", 3),
    ("fdr05_lesion_detection", "lesions ≥ 1 ml found @ FDR 0.05", 2),
    ("fdr05_lesion_vols_found", "lesion vols found @ FDR 0.05", 2),
    ("fdr05_FPclusters", "false clusters / healthy vol. @ FDR 0.05", 2),
    ("fdr05_healthy_flagged", "healthy vols flagged @ FDR 0.05", 2),
    ("fdr10_healthy_flagged", "healthy vols flagged @ FDR 0.1", 2),
    ("volume_p05_TPR", "lesion vols p ≤ 0.05", 2),
    ("volume_p05_FPR", "healthy vols p ≤ 0.05", 2),
    ("volume_p_KS", "KS of healthy volume p", 3),
    ("healthy_volumes", "healthy test vols", 0),
    ("calibration_volumes", "calibration vols", 0),
]
_HIGHER_IS_BETTER = {key for key, _name, _digits in TABLE_COLUMNS[:7]} | {"fdr05_Dice", "fdr05_lesion_detection", "fdr05_lesion_vols_found"}
_FAMILY_FOUND = f"fdr05_{FOUND_IN_FAMILY}"  # + family: share of the family's lesion volumes with a flagged lesion voxel


def results_frame(results: list[dict]) -> pd.DataFrame:
    """One row per run: run settings, every metric, timings and sizes."""
    rows = []
    for result in results:
        row = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
        row.update(result.get("metrics", {}))
        row.update(result.get("calibrated") or {})
        row["parameters_m"] = result.get("parameters", 0) / 1e6
        if result.get("select_checkpoint"):
            # Results of a checkpoint chosen on labelled validation volumes are named as such everywhere.
            row["label"] = f"{row['label']} [{PROTOCOL_LABEL}]"
        rows.append(row)
    return pd.DataFrame(rows)


def breakdown_frame(results: list[dict], frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (run, lesion group) of the runs' :class:`~simpleslicenet.metrics.breakdown.MetricBreakdown`.

    The ``dataset`` column names the group too (``phantom · family: small``), so :func:`summary_table`
    compares the models within each group.

    Args:
        results: The runs' results.
        frame: Their :func:`results_frame`, when already made (made here otherwise).
    """
    frame = results_frame(results) if frame is None else frame
    rows = []
    for result, (_, row) in zip(results, frame.iterrows(), strict=True):
        for group, values in (result.get("breakdown") or {}).items():
            rows.append({"dataset": f"{row['dataset']} · {group}", "label": row["label"], "seed": row.get("seed"), **values})
    return pd.DataFrame(rows)


def summary_cells(frame: pd.DataFrame, columns: list[tuple[str, str, int]] = TABLE_COLUMNS) -> Table:
    """One row per (dataset, model): mean ± std over seeds, best accuracy in bold (the cells keep the means)."""
    columns = [c for c in columns if c[0] in frame.columns]
    header = ["dataset", "model", "seeds", *[c[1] for c in columns]]
    groups = frame.groupby(["dataset", "label"], sort=False)
    best = {}
    for key, _name, _digits in (c for c in columns if c[0] in _HIGHER_IS_BETTER):
        means = groups[key].mean()
        best.update({(ds, key): means.xs(ds).max() for ds in means.index.get_level_values(0)})
    rows = []
    for (dataset, label), group in groups:
        cells = [Cell(str(dataset)), Cell(str(label)), Cell(str(len(group)), float(len(group)))]
        for key, _name, digits in columns:
            values = group[key].dropna().astype(float)
            if values.empty:
                cells.append(Cell("–"))
                continue
            mean = float(values.mean())
            text = f"{mean:.{digits}f}" + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")
            cells.append(Cell(text, mean, bool((dataset, key) in best and np.isclose(mean, best[(dataset, key)]))))
        rows.append(cells)
    return Table(header, rows, fields=["dataset", "model", "seeds", *[c[0] for c in columns]])


def summary_table(frame: pd.DataFrame, columns: list[tuple[str, str, int]] = TABLE_COLUMNS) -> str:
    """Markdown table, one line per (dataset, model): mean ± std over seeds, best accuracy in bold."""
    return summary_cells(frame, columns).to_markdown()


def calibration_cells(results: list[dict], levels: tuple[float, ...] = (0.05, 0.1)) -> Table | None:
    """Table of the label-free calibration pooled over every run (seed) of a (dataset, model).

    Pooling makes the check the one conformal prediction promises: over calibration draws, the share of
    healthy volumes flagged at FDR ``q`` (any voxel) and with volume p-value <= ``q`` stays at or below ``q``
    up to sampling error, and healthy volume p-values are uniform (KS distance on the p-values' grid,
    against the continuous test's 5% critical value, which the grid's can only be below).
    """
    pooled: dict[tuple[str, str], dict] = {}
    for result in results:
        calibrated, pvalues = result.get("calibrated") or {}, result.get("volume_pvalues")
        if not calibrated or not pvalues:
            continue
        entry = pooled.setdefault(
            (result["dataset"], result["label"]), {"p": [], "n": 0, "flagged": dict.fromkeys(levels, 0.0), "grain": set()}
        )
        entry["grain"].add(int(calibrated["calibration_volumes"]))
        n = int(calibrated["healthy_volumes"])
        entry["p"] += pvalues["healthy"]
        entry["n"] += n
        for q in levels:
            entry["flagged"][q] += calibrated.get(f"fdr{round(q * 100):02d}_healthy_flagged", float("nan")) * n
    if not pooled:
        return None
    header = ["dataset", "model", "healthy test vols"]
    header += [f"flagged @ FDR {q:g} (≤ {q:g} + 2 SE)" for q in levels]
    header += [f"volume p ≤ {q:g}" for q in levels] + ["KS of volume p (5% critical)"]
    fields = ["dataset", "model", "healthy_volumes"]
    fields += [f"fdr{round(q * 100):02d}_healthy_flagged" for q in levels] + [f"volume_p{round(q * 100):02d}_FPR" for q in levels]
    rows = []
    for (dataset, label), entry in pooled.items():
        n, p = entry["n"], np.asarray(entry["p"], dtype=float)
        cells = [Cell(str(dataset)), Cell(str(label)), Cell(str(n), float(n))]
        for q in levels:
            bound = q + 2 * np.sqrt(q * (1 - q) / n)
            share = entry["flagged"][q] / n
            cells.append(Cell(f"{share:.3f} ({bound:.3f})", float(share)))
        cells += [Cell(f"{np.mean(p <= q):.3f}", float(np.mean(p <= q))) for q in levels]
        grain = entry["grain"].pop() if len(entry["grain"]) == 1 else None  # one calibration size: its grid
        ks = ks_uniform(p, grain)
        cells.append(Cell(f"{ks:.3f} ({1.358 / np.sqrt(p.size):.3f})", float(ks)))
        rows.append(cells)
    return Table(header, rows, fields=[*fields, "volume_p_KS"])


def calibration_check(results: list[dict], levels: tuple[float, ...] = (0.05, 0.1)) -> str:
    """Markdown of :func:`calibration_cells` (``""`` when no run was calibrated)."""
    table = calibration_cells(results, levels)
    return "" if table is None else table.to_markdown()


def _save_figure(fig, path: Path, dpi: int) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def _plot_accuracy_vs_time(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, group in frame.groupby("label", sort=False):
        x = group["inference_seconds_per_volume"].astype(float)
        y = group["voxel_AUPRC"].astype(float)
        ax.errorbar(x.mean(), y.mean(), xerr=x.std(ddof=0), yerr=y.std(ddof=0), fmt="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("inference time per volume (s, log scale)")
    ax.set_ylabel("voxel AUPRC (brain-masked)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=120)


def _plot_breakdown(groups: pd.DataFrame, path: Path) -> None:
    """Bars per lesion group and model (mean over seeds, whiskers one std) for the main accuracy figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("volume_AUROC", "voxel_AUPRC", "lesion_detection") if m in groups.columns]
    names = groups["dataset"].str.split(" · ", n=1).str[-1]
    order = list(dict.fromkeys(names))
    labels = list(dict.fromkeys(groups["label"]))
    width = 0.8 / max(1, len(labels))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.1 * len(order)), 2.6 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        for i, label in enumerate(labels):
            rows = groups[groups["label"] == label].assign(group=names)
            stats = rows.groupby("group")[metric].agg(["mean", "std"]).reindex(order)
            x = np.arange(len(order)) + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, stats["mean"], width, yerr=stats["std"].fillna(0), capsize=2, label=label)
        ax.set_xticks(np.arange(len(order)), order, fontsize=7, rotation=15)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)


def _examples_figure(frame: pd.DataFrame, runs_dir: Path, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for label, group in frame.groupby("label", sort=False):
        for _, row in group.iterrows():
            example = runs_dir / str(row["run_id"]) / "example.png"
            if isinstance(row.get("example"), str) and example.exists():
                images.append((label, plt.imread(example)))
                break
    if not images:
        return False
    fig, axes = plt.subplots(len(images), 1, figsize=(6, 3.2 * len(images)))
    for ax, (_label, image) in zip(np.atleast_1d(axes), images, strict=True):
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    return True


def report_sections(
    results: list[dict],
    frame: pd.DataFrame | None = None,
    groups: pd.DataFrame | None = None,
) -> list[ReportSection]:
    """The report's tables with their headings and notes, in order: built once for the markdown and the HTML.

    Args:
        results: The runs' results.
        frame: Their :func:`results_frame`, when already made (made here otherwise).
        groups: Their :func:`breakdown_frame`, when already made (made here otherwise).
    """
    frame = results_frame(results) if frame is None else frame
    sections = [
        ReportSection(
            table=summary_cells(frame),
            after=(
                "Voxel metrics are pooled over all test volumes inside the brain mask. "
                "'Dice @ val thr.' uses the threshold that maximised Dice on the validation split (the honest figure); "
                "'max Dice' picks the best threshold on the test set itself and is an upper bound."
            ),
        )
    ]
    if "fdr05_Dice" in frame.columns:
        sections.append(
            ReportSection(
                "Label-free outputs",
                "Conformal p-values against the calibration split (healthy training volumes held out of training); "
                "masks by Benjamini–Hochberg at the stated false discovery rate, with no lesion label used.",
                summary_cells(frame, CALIBRATED_COLUMNS),
            )
        )
        families = [(key, f"{key.removeprefix(_FAMILY_FOUND)} vols found @ FDR 0.05", 2) for key in frame.columns if key.startswith(_FAMILY_FOUND)]
        if families:
            sections.append(
                ReportSection(text="Lesion volumes with a flagged voxel on the lesion, by lesion family:", table=summary_cells(frame, families))
            )
        check = calibration_cells(results)
        if check is not None:
            sections.append(
                ReportSection(text="The calibration pooled over seeds (each seed its own phantom, split and calibration):", table=check)
            )
    groups = breakdown_frame(results, frame) if groups is None else groups
    if not groups.empty:
        sections.append(
            ReportSection(
                "By lesion family and lesion size",
                "Each group is its lesion volumes against every healthy test volume; sizes are a volume's total lesion volume.",
                summary_cells(groups),
            )
        )
    return sections


def write_report(
    results: list[dict],
    output: Path,
    title: str = "benchmark",
    failures: list[dict] | None = None,
    command: str | None = None,
) -> None:
    """Write ``results.csv``, ``results.md``, the PNG plots and ``report.html`` (all in one page) into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if not results:
        atomic_write_text(output / "results.md", f"# {title}\n\nNo finished runs.\n")
        html = render_sweep_report(title, [ReportSection(text="No finished runs.")], command=command, failures=failures)
        atomic_write_text(output / "report.html", html)
        return
    frame = results_frame(results)
    groups = breakdown_frame(results, frame)
    atomic_write_text(output / "results.csv", frame.to_csv(index=False))
    sections = report_sections(results, frame, groups)
    text = f"# {title}\n\n" + (f"Produced by `{command}`.\n\n" if command else "")
    text += "".join(section.to_markdown() for section in sections)
    if failures:
        text += "\nFailed runs (retried on the next call):\n" + "".join(
            f"- {f['dataset']} / {f['label']} / seed {f['seed']}: {f['error']} (log: {f['log']})\n" for f in failures
        )
    atomic_write_text(output / "results.md", text)
    pictures = []
    if "voxel_AUPRC" in frame.columns:
        _plot_accuracy_vs_time(frame, output / "accuracy_vs_time.png")
        pictures.append(("Voxel AUPRC against inference time per volume (mean over seeds, whiskers one std).", output / "accuracy_vs_time.png"))
    if not groups.empty:
        _plot_breakdown(groups, output / "breakdown.png")
        pictures.append(("Accuracy by lesion family and lesion size (mean over seeds, whiskers one std).", output / "breakdown.png"))
    if _examples_figure(frame, output / "runs", output / "examples.png"):
        pictures.append(("One test volume of each model.", output / "examples.png"))
    atomic_write_text(output / "report.html", render_sweep_report(title, sections, pictures, command=command, failures=failures))
