"""The HTML reports: numbers equal to the record's, and the pages opened in a real (headless) Chromium.

The pages are rendered from real arrays: a phantom scan with a lesion, its map the difference to the
same subject's healthy scan after smoothing, p-values and an FDR mask from a conformal calibration on
noisy healthy maps, clusters measured on that mask. The browser tests need Chromium, its driver and
Selenium and are skipped, with the reason, where one is missing.
"""

from __future__ import annotations

import json
import math
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.reports import cluster_records
from simpleslicenet.reports.browser import PageLoad, open_page

MAX_PAGE_BYTES = 3 * 1024 * 1024


class _Numbers(HTMLParser):
    """Every ``(data-field, data-value)`` of a page, with the ``data-scan`` of the row it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[tuple[str | None, str, str]] = []
        self._scan: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr":
            self._scan = attributes.get("data-scan")
        if "data-value" in attributes:
            self.numbers.append((self._scan, attributes.get("data-field") or "", attributes["data-value"] or ""))


def page_numbers(html: str) -> list[tuple[str | None, str, str]]:
    """``(row's scan, data-field, data-value)`` of every number on a page."""
    parser = _Numbers()
    parser.feed(html)
    return parser.numbers


def resolve(record: dict, field: str) -> object:
    """The value at a dotted path (``clusters.0.peak_mm.2``) of a record."""
    value: object = record
    for part in field.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]  # type: ignore[index]
    return value


def same_number(shown: str, value: object) -> bool:
    """Whether a ``data-value`` is exactly the record's value (``"null"`` for ``None``)."""
    if value is None:
        return shown == "null"
    return shown != "null" and (float(shown) == float(value) or (math.isnan(float(shown)) and math.isnan(float(value))))


@pytest.fixture(scope="session")
def report_data() -> dict:
    """Arrays and records of two phantom scans (with and without a lesion) on a 4 mm grid, and a calibration.

    The model grid is a box cut from the scan (as preprocessing cuts it), so the peaks' coordinates go
    through :func:`~simpleslicenet.reports.grid_affine`'s shift.
    """
    from scipy import ndimage

    from simpleslicenet.calibration import ConformalCalibration
    from simpleslicenet.data.geometry import crop_or_pad, to_slices
    from simpleslicenet.data.phantom import generate_subject
    from simpleslicenet.reports import grid_affine

    sick = generate_subject(0, lesion=True, spacing_mm=4.0)
    healthy = generate_subject(0, lesion=False, spacing_mm=4.0)
    start, box = (1, 2, 0), (48, 56, 48)
    geometry = VolumeGeometry(sick.image.shape, sick.affine, sick.affine, start, box)

    def model_grid(array: np.ndarray) -> np.ndarray:
        return to_slices(crop_or_pad(np.asarray(array), start, box))

    image, reference = model_grid(sick.image), model_grid(healthy.image)
    brain = model_grid(sick.brain_mask).astype(bool)
    lesion = model_grid(sick.seg).astype(bool)
    scale = float(np.percentile(reference[brain], 99))
    smooth_reference = ndimage.gaussian_filter(reference, 1.0)
    rng = np.random.default_rng(0)

    def score(scan: np.ndarray) -> np.ndarray:
        return (np.abs(ndimage.gaussian_filter(scan, 1.0) - smooth_reference) / scale).astype(np.float32)

    def noisy() -> np.ndarray:
        return reference + rng.normal(0, 0.02 * scale, reference.shape).astype(np.float32)

    calibration_maps = [score(noisy()) for _ in range(19)]  # FDR 0.05 needs 19 scans (q (n + 1) >= 1)
    calibration = ConformalCalibration.from_scores([m[brain] for m in calibration_maps], [float(m[brain].max()) for m in calibration_maps])
    calibration_scores = calibration.volume_scores.tolist()
    scans = {}
    for name, scan, truth in (("sub-01_T2w", image, lesion), ("sub-02_T2w", noisy(), None)):
        score_map = score(scan)
        pvalue_map = calibration.pvalue_map(score_map, brain)
        mask = calibration.flag_map(pvalue_map, brain, 0.05)
        volume_score = float(score_map[brain].max())
        record = {
            "scan": name,
            "subject": name[4:6],
            "session": None,
            "source": f"sub-{name[4:6]}/anat/{name}.nii.gz",
            "model": {"path": "model.xml", "sha256": "0" * 64, "name": "SimpleSliceNet", "settings": {"flow_blocks": 2, "smoothing_sigma": 1.0}},
            "preprocessing": {"target_shape": list(box), "spacing_mm": 4.0, "n4": False},
            "calibration": {"path": "calibration.json", "sha256": "1" * 64, "n_scans": calibration.n_scans},
            "fdr": 0.05,
            "threshold": None,
            "volume_score": volume_score,
            "volume_pvalue": calibration.volume_pvalue(volume_score),
            "slice_scores": [float(v) for v in np.where(brain, score_map, 0).reshape(score_map.shape[0], -1).max(1)],
            "clusters": cluster_records(mask, score_map, pvalue_map, geometry),
            "space": "MNI152NLin2009aAsym",
            "software": {"simpleslicenet": "test", "python": "3"},
        }
        scans[name] = {
            "record": record, "image": scan, "brain": brain, "score_map": score_map, "pvalue_map": pvalue_map,
            "mask": mask, "affine": grid_affine(geometry), "calibration_scores": calibration_scores, "lesion": truth,
        }  # fmt: skip
    loo = [calibration.volume_pvalue(s) for s in calibration_scores]
    return {"scans": scans, "calibration_pvalues": loo, "geometry": geometry}


def _render_subject(entry: dict) -> str:
    from simpleslicenet.reports import render_subject_report

    return render_subject_report(
        entry["record"], entry["image"], entry["brain"], entry["score_map"], entry["pvalue_map"], entry["mask"],
        entry["affine"], entry["calibration_scores"], lesion=entry["lesion"],
    )  # fmt: skip


def _group_rows(report_data: dict) -> list[dict]:
    rows = []
    for name, entry in report_data["scans"].items():
        record = entry["record"]
        rows.append(
            {
                "name": name, "subject": record["subject"], "session": None, "href": f"{name}.html",
                "volume_score": record["volume_score"], "volume_pvalue": record["volume_pvalue"],
                "clusters": len(record["clusters"]), "flagged_ml": sum(c["size_ml"] for c in record["clusters"]),
                "group": "patient" if entry["lesion"] is not None else "control", "status": "ok", "error": None,
            }
        )  # fmt: skip
    # A third scan with the second's p-value and a higher score ranks before it; one failed scan.
    second = rows[1]
    rows.append({**second, "name": "sub-03_T2w", "subject": "03", "href": None, "volume_score": second["volume_score"] + 1.0})
    rows.append({"name": "sub-04_T2w", "subject": "04", "session": None, "href": None, "status": "failed", "error": "sub-04_T2w.nii.gz: not a NIfTI file"})
    return rows


@pytest.fixture(scope="session")
def report_pages(report_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subject pages and the group page written into one folder."""
    from simpleslicenet.reports import render_group_report

    folder = tmp_path_factory.mktemp("reports")
    pages = {}
    for name, entry in report_data["scans"].items():
        start = time.perf_counter()
        (folder / f"{name}.html").write_text(_render_subject(entry), encoding="utf-8")
        print(f"rendered {name}.html in {time.perf_counter() - start:.2f} s")
        pages[name] = folder / f"{name}.html"
    rows = _group_rows(report_data)
    provenance = {"model": {"path": "model.xml", "sha256": "0" * 64}, "calibration": {"n_scans": 19}, "fdr": 0.05}
    (folder / "group.html").write_text(render_group_report(rows, report_data["calibration_pvalues"], provenance), encoding="utf-8")
    pages["group"] = folder / "group.html"
    return {"folder": folder, "pages": pages, "rows": rows}


# -- the pages' content, without a browser -----------------------------------------------------------


def test_subject_page_numbers_are_the_records(report_data: dict, report_pages: dict) -> None:
    """Every number in ``data-value`` is the record's own; the page is self-contained and under 3 MB."""
    for name, entry in report_data["scans"].items():
        record, path = entry["record"], report_pages["pages"][name]
        html = path.read_text(encoding="utf-8")
        assert path.stat().st_size < MAX_PAGE_BYTES, path.stat().st_size
        assert "http://" not in html and "https://" not in html and "<img src=\"data:image/png;base64," in html
        numbers = page_numbers(html)
        fields = {field for _, field, _ in numbers}
        required = {"volume_score", "volume_pvalue", "fdr", "calibration.n_scans", "model.settings.flow_blocks"}
        for i in range(len(record["clusters"])):
            required |= {f"clusters.{i}.{key}" for key in ("id", "size_ml", "peak_score", "peak_pvalue")}
            required |= {f"clusters.{i}.peak_mm.{axis}" for axis in range(3)}
        assert required <= fields, required - fields
        for _, field, shown in numbers:
            if not field.startswith("derived."):
                assert same_number(shown, resolve(record, field)), (name, field, shown)
        derived = {field: shown for _, field, shown in numbers if field.startswith("derived.")}
        assert float(derived["derived.clusters"]) == len(record["clusters"])
        if record["clusters"]:
            # The views go through the hottest cluster's peak: the one with the highest peak score.
            hottest = max(record["clusters"], key=lambda cluster: cluster["peak_score"])
            assert float(derived["derived.hottest_cluster"]) == hottest["id"]
            for axis in range(3):
                assert float(derived[f"derived.peak_mm.{axis}"]) == pytest.approx(hottest["peak_mm"][axis], abs=0.01)
            # The page's grid voxel (d, h, w) is the record's file voxel (i, j, k) less the model box's start.
            d, h, w = (int(float(derived[f"derived.peak_voxel.{axis}"])) for axis in range(3))
            start = report_data["geometry"].crop_start
            assert [w + start[0], h + start[1], d + start[2]] == hottest["peak_voxel"]
        assert "template coordinates (MNI152NLin2009aAsym)" in html or not record["clusters"]
    lesion = report_data["scans"]["sub-01_T2w"]["record"]
    assert lesion["clusters"] and lesion["volume_pvalue"] < report_data["scans"]["sub-02_T2w"]["record"]["volume_pvalue"]


def test_group_page_ranks_and_lists_failures(report_pages: dict) -> None:
    """The group table is in ranking order with each scan's exact numbers; the failed scan shows its error."""
    from simpleslicenet.reports import rank_rows

    rows = report_pages["rows"]
    html = report_pages["pages"]["group"].read_text(encoding="utf-8")
    ranked = [row["name"] for row in rank_rows(rows)]
    assert ranked == ["sub-01_T2w", "sub-03_T2w", "sub-02_T2w"]
    numbers = page_numbers(html)
    order = list(dict.fromkeys(scan for scan, field, _ in numbers if field == "volume_score"))
    assert order == ranked
    by_name = {row["name"]: row for row in rows}
    for scan, field, shown in numbers:
        if scan in by_name and field in {"volume_score", "volume_pvalue", "clusters", "flagged_ml"}:
            assert same_number(shown, by_name[scan][field]), (scan, field, shown)
    assert "sub-04_T2w.nii.gz: not a NIfTI file" in html
    assert len(html.encode()) < MAX_PAGE_BYTES


def test_scores_csv_and_group_page_rank_alike() -> None:
    """``scores.csv`` of predict and the group page list scans in one order: p-value, score, name; no p-value last."""
    from simpleslicenet.deploy.report import PredictionReport
    from simpleslicenet.reports import rank_rows

    scans = [("c", 0.5, 2.0), ("a", 0.5, 2.0), ("b", None, 9.0), ("d", 0.1, 0.0), ("e", 0.5, 3.0), ("f", math.nan, 1.0)]
    records = [{"scan": name, "volume_score": score, **({} if p is None else {"volume_pvalue": p})} for name, p, score in scans]
    rows = [{"name": name, "volume_pvalue": p, "volume_score": score, "status": "ok"} for name, p, score in scans]
    expected = ["d", "e", "a", "c", "b", "f"]
    assert [record["scan"] for record in PredictionReport(Path("out"), scans=records).ranked()] == expected
    assert [row["name"] for row in rank_rows(rows)] == expected


def test_sweep_report_html(tmp_path: Path) -> None:
    """``write_report`` writes ``report.html``: the markdown's tables with their numbers, the figures embedded."""
    import pandas as pd

    from simpleslicenet.benchmark.report import write_report

    results = []
    for label, auprc in (("SimpleSliceNet", 0.6), ("AE3D", 0.3)):
        for seed in (0, 1):
            results.append(
                {
                    "dataset": "phantom", "label": label, "seed": seed, "run_id": f"{label}-{seed}",
                    "metrics": {"voxel_AUPRC": auprc + 0.01 * seed, "voxel_AUROC": 0.9, "volume_AUROC": 0.8},
                    "calibrated": {"fdr05_Dice": 0.4, "fdr05_healthy_flagged": 0.0, "fdr10_healthy_flagged": 0.5,
                                   "healthy_volumes": 2, "calibration_volumes": 4, "volume_p_KS": 0.2},
                    "volume_pvalues": {"healthy": [0.2, 0.6]},
                    "breakdown": {"family: tumour": {"lesion_volumes": 3, "voxel_AUPRC": auprc, "volume_AUROC": 0.7}},
                    "inference_seconds_per_volume": 0.5, "fit_seconds": 10.0, "peak_ram_mb": 900.0, "parameters": 1e6,
                }
            )  # fmt: skip
    write_report(results, tmp_path, title="tiny", command="simpleslicenet benchmark tiny.yaml")
    markdown, html = (tmp_path / "results.md").read_text(), (tmp_path / "report.html").read_text()
    assert "| phantom | SimpleSliceNet | 2 | **0.605 ± 0.007** |" in markdown and "## By lesion family and lesion size" in markdown
    assert "By lesion family and lesion size" in html and "phantom · family: tumour" in html
    frame = pd.read_csv(tmp_path / "results.csv")
    means = frame.groupby("label")["voxel_AUPRC"].mean()
    shown = [float(value) for _, field, value in page_numbers(html) if field == "voxel_AUPRC"]
    assert means["SimpleSliceNet"] in shown and means["AE3D"] in shown
    assert html.count("<img src=\"data:image/png;base64,") == 2  # accuracy against time, the breakdown


# -- in Chromium -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():  # noqa: ANN201
    """One headless Chromium for the session, its console log readable."""
    from simpleslicenet.reports.browser import browser_missing, headless_chromium

    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    driver = headless_chromium()
    yield driver
    driver.quit()


def _open(driver, path: Path) -> PageLoad:  # noqa: ANN001
    """Load a page: no console error, every picture decoded."""
    page = open_page(driver, path)
    assert page.errors == [], page.console
    assert page.images and page.undecoded == [], page.images
    return page


def test_subject_page_in_chromium(browser, report_pages: dict, tmp_path: Path) -> None:  # noqa: ANN001
    """The subject page loads without a console error, every image decodes; a screenshot is kept."""
    page = _open(browser, report_pages["pages"]["sub-01_T2w"])
    assert len(page.images) == 4  # mosaic, views, calibration, slice scores
    print(f"subject page ({page.size_bytes / 1024:.0f} KiB): load event {page.load_ms:.0f} ms after navigation start")
    browser.find_element("css selector", "#provenance summary").click()  # the collapsible provenance opens
    assert browser.execute_script("return document.getElementById('provenance').open;") is True
    screenshot = tmp_path / "subject.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 1000


def test_group_page_in_chromium(browser, report_pages: dict, tmp_path: Path) -> None:  # noqa: ANN001
    """The group page: no console error, images decode, ranking order, sorting by a header, link to a subject."""
    from selenium.webdriver.common.by import By

    from simpleslicenet.reports import rank_rows

    _open(browser, report_pages["pages"]["group"])
    screenshot = tmp_path / "group.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 1000

    def order() -> list[str]:
        return [row.get_attribute("data-scan") for row in browser.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")]

    rows = report_pages["rows"]
    assert order() == [row["name"] for row in rank_rows(rows)]
    header = browser.find_element(By.CSS_SELECTOR, "#ranking th[data-column='volume_score']")
    header.click()
    ok = [row for row in rows if row["status"] == "ok"]
    assert order() == [row["name"] for row in sorted(ok, key=lambda r: r["volume_score"])]
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert order() == [row["name"] for row in sorted(ok, key=lambda r: -r["volume_score"])]
    browser.find_element(By.CSS_SELECTOR, "#ranking th[data-column='name']").click()
    assert order() == sorted(row["name"] for row in ok)

    browser.find_element(By.LINK_TEXT, "sub-01_T2w").click()
    target = report_pages["pages"]["sub-01_T2w"]
    assert browser.current_url == target.as_uri()
    assert browser.find_element(By.TAG_NAME, "h1").text == "sub-01_T2w"
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_sweep_report_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001
    """The sweep's page loads without a console error and its figures decode."""
    from simpleslicenet.benchmark.report import write_report

    result = {
        "dataset": "phantom", "label": "AE3D", "seed": 0, "run_id": "r0", "metrics": {"voxel_AUPRC": 0.3},
        "breakdown": {"size: < 2 ml": {"lesion_volumes": 1, "voxel_AUPRC": 0.2}}, "inference_seconds_per_volume": 0.1,
    }  # fmt: skip
    write_report([result], tmp_path, title="one run")
    assert len(_open(browser, tmp_path / "report.html").images) == 2
    assert json.loads(browser.execute_script("return JSON.stringify(document.querySelectorAll('table').length);")) == 2
