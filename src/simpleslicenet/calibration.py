"""Label-free thresholds: conformal p-values from healthy calibration scans, Benjamini–Hochberg masks.

A model's scores are in its own units. Compared with the same model's scores on healthy scans it did not
train on (the *calibration* scans: a held-out part of the training cohort, or a new site's own healthy
scans; never a lesion scan), they become p-values that need no lesion label to read:

* **voxel p-value** ``p(s) = (1 + #{calibration brain voxels scoring >= s}) / (N + 1)``, the marginal
  conformal p-value of Bates et al. (Ann. Statist. 2023) over all ``N`` calibration brain voxels;
* **volume p-value** ``(1 + #{calibration scans whose volume score >= s}) / (n + 1)`` over ``n`` scans;
* **FDR mask** at level ``q``: the brain voxels of one scan that pass Benjamini–Hochberg, at ``q`` or at
  the lower level the calibration scans call for (below).

Why the BH level is calibrated too, and what is guaranteed. A pooled voxel p-value is valid for a voxel
drawn at random from a healthy brain, but not at every fixed place: regions whose healthy scores run
high (a tissue border, the slab's ends) get small p-values in every scan, and the voxels of one scan move
together, so BH at ``q`` carries no guarantee for a whole healthy scan. BH at level ``λ`` flags anything
in a scan exactly when the scan's Simes statistic ``min_k p_(k) m / k`` is at most ``λ``. Each
calibration scan's Simes statistic is computed against the *other* calibration scans (leave-one-out), and
the mask uses ``λ = min(q, just below the k-th smallest of them)``, ``k = ⌊q (n + 1)⌋``. A new healthy
scan exchangeable with the calibration scans is then flagged with probability at most ``q`` (the
conformal argument on the Simes statistic; the leave-one-out pools are one scan smaller than the
test's, a small asymmetry), whatever the spatial structure of the maps. It needs ``n >= 1/q - 1``
calibration scans (19 for ``q = 0.05``); with fewer, nothing is flagged. The tests check the bound over
many calibration draws of smooth random fields with a fixed spatial pattern. The volume p-value is exactly valid
(``P(p <= a) <= a``) under the same exchangeability. No voxel p-value is below ``1 / (N + 1)``.

The voxel scores are stored compactly: exact counts at each of the highest ``EXACT_RANKS`` scores and
at ranks spaced by ``RANK_RATIO`` below them; a score between two stored ones takes the count of the
lower one, so a p-value is never smaller than its exact value (rounded up by at most 1%).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpleslicenet.atomic import atomic_write_text

__all__ = [
    "CalibrationError",
    "ConformalCalibration",
    "benjamini_hochberg",
    "benjamini_hochberg_cutoff",
    "model_digest",
    "simes_statistic",
]

FORMAT = "simpleslicenet-calibration"
VERSION = 1
EXACT_RANKS = 2048
RANK_RATIO = 1.01
MAX_FILE_BYTES = 16 * 2**20


class CalibrationError(ValueError):
    """A calibration file or calibration data that cannot be used; the message names the file."""


def model_digest(model_path: str | os.PathLike) -> str:
    """SHA-256 of a model file (an OpenVINO ``.xml`` together with its ``.bin``), to pair calibrations."""
    path = Path(model_path)
    digest = hashlib.sha256()
    for part in (path, path.with_suffix(".bin")) if path.suffix.lower() == ".xml" else (path,):
        if part.is_file():
            with part.open("rb") as handle:
                for chunk in iter(lambda: handle.read(2**20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _check_rate(q: float) -> float:
    if not 0.0 < q < 1.0:
        msg = f"the false discovery rate must lie strictly between 0 and 1, got {q!r}"
        raise ValueError(msg)
    return float(q)


def simes_statistic(pvalues: np.ndarray) -> float:
    """``min_k p_(k) m / k``: Benjamini–Hochberg at level ``λ`` rejects something exactly when this is ``<= λ``."""
    ordered = np.sort(np.asarray(pvalues, dtype=np.float64).ravel())
    if ordered.size == 0:
        return 1.0
    return float(np.min(ordered * ordered.size / np.arange(1, ordered.size + 1)))


def benjamini_hochberg_cutoff(ordered: np.ndarray, q: float) -> float | None:
    """The largest of the increasingly ``ordered`` p-values that Benjamini–Hochberg at ``q`` rejects.

    Every p-value at or below it is rejected; ``None`` when nothing is (also for ``q = 0``, the level a
    calibration gives when it has too few scans, and for no p-value at all).
    """
    if q == 0:
        return None
    _check_rate(q)
    ordered = np.asarray(ordered, dtype=np.float64).ravel()
    passing = np.nonzero(ordered <= q * np.arange(1, ordered.size + 1) / ordered.size)[0]
    return float(ordered[passing[-1]]) if passing.size else None


def benjamini_hochberg(pvalues: np.ndarray, q: float) -> np.ndarray:
    """Benjamini–Hochberg at false discovery rate ``q``: a boolean array, ``True`` where rejected."""
    cutoff = benjamini_hochberg_cutoff(np.sort(np.asarray(pvalues, dtype=np.float64).ravel()), q)
    if cutoff is None:
        return np.zeros(np.shape(pvalues), dtype=bool)
    return np.asarray(pvalues) <= cutoff


def _leave_one_out_simes(scan: np.ndarray, pooled: np.ndarray) -> float:
    """Simes statistic of one calibration scan (sorted scores) against the pool of all the *other* scans."""
    others = pooled.size - scan.size
    at_least_all = pooled.size - np.searchsorted(pooled, scan, side="left")
    at_least_own = scan.size - np.searchsorted(scan, scan, side="left")
    return simes_statistic((1.0 + at_least_all - at_least_own) / (others + 1.0))


def _knot_ranks(n: int) -> np.ndarray:
    """1-based ranks (from the top) whose scores are stored: all of the first ones, then spaced."""
    ranks = list(range(1, min(n, EXACT_RANKS) + 1))
    while ranks[-1] < n:
        ranks.append(min(n, math.ceil(ranks[-1] * RANK_RATIO)))
    return np.asarray(ranks)


@dataclass(frozen=True)
class ConformalCalibration:
    """Healthy-scan reference of one model, turning its scores into p-values.

    Args:
        voxel_scores: Stored voxel scores, strictly increasing.
        voxel_at_least: For each, the number of calibration brain voxels scoring at least as high.
        voxel_above: For each, the number scoring strictly higher.
        n_voxels: Calibration brain voxels in all (``N``).
        volume_scores: Volume score of every calibration scan, increasing.
        simes_statistics: Leave-one-out Simes statistic of every calibration scan, increasing.
        model_sha256: Digest of the model file it was made with (:func:`model_digest`), if from a file.
    """

    voxel_scores: np.ndarray
    voxel_at_least: np.ndarray
    voxel_above: np.ndarray
    n_voxels: int
    volume_scores: np.ndarray
    simes_statistics: np.ndarray
    model_sha256: str | None = None

    @classmethod
    def from_scores(
        cls,
        voxel_scores: Iterable[np.ndarray],
        volume_scores: Sequence[float],
        model_sha256: str | None = None,
    ) -> ConformalCalibration:
        """Calibrate on healthy scans: each one's brain-voxel scores and its volume score.

        Raises:
            CalibrationError: No scan, no brain voxel, or a score that is not finite.
        """
        scans = [np.sort(np.asarray(s, dtype=np.float64).ravel()) for s in voxel_scores]
        pooled = np.concatenate(scans or [np.zeros(0)])
        volumes = np.sort(np.asarray(volume_scores, dtype=np.float64))
        if volumes.size == 0 or pooled.size == 0 or len(scans) != volumes.size or min(s.size for s in scans) == 0:
            msg = "calibration needs at least one healthy scan with brain voxels, and one volume score per scan"
            raise CalibrationError(msg)
        if not (np.isfinite(pooled).all() and np.isfinite(volumes).all()):
            msg = "calibration scores must be finite"
            raise CalibrationError(msg)
        pooled.sort()
        n = pooled.size
        values = np.unique(pooled[n - _knot_ranks(n)])
        at_least = n - np.searchsorted(pooled, values, side="left")
        above = n - np.searchsorted(pooled, values, side="right")
        simes = np.sort([_leave_one_out_simes(scan, pooled) for scan in scans]) if len(scans) > 1 else np.ones(1)
        return cls(values, at_least, above, int(n), volumes, simes, model_sha256)

    # -- p-values ---------------------------------------------------------------------------------
    @property
    def n_scans(self) -> int:
        """Number of calibration scans (``n``)."""
        return int(self.volume_scores.size)

    @property
    def smallest_voxel_pvalue(self) -> float:
        """``1 / (N + 1)``: no voxel p-value can be smaller."""
        return 1.0 / (self.n_voxels + 1)

    def voxel_pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of every score (same shape, float32; never below its exact value)."""
        s = np.asarray(scores, dtype=np.float64)
        idx = np.searchsorted(self.voxel_scores, s, side="left")  # stored scores below s
        at = np.minimum(idx, self.voxel_scores.size - 1)
        exact = (idx < self.voxel_scores.size) & (self.voxel_scores[at] == s)
        below = np.maximum(idx - 1, 0)
        # Between stored scores: at most as many as lie above the stored score just below s.
        count = np.where(exact, self.voxel_at_least[at], np.where(idx > 0, self.voxel_above[below], self.n_voxels))
        return ((1.0 + count) / (self.n_voxels + 1.0)).astype(np.float32)

    def volume_pvalue(self, score: float) -> float:
        """Conformal p-value of a volume score among the calibration scans' volume scores."""
        higher = self.volume_scores.size - int(np.searchsorted(self.volume_scores, float(score), side="left"))
        return (1.0 + higher) / (self.volume_scores.size + 1.0)

    def fdr_level(self, q: float) -> float:
        """The BH level used for false discovery rate ``q``: ``q``, or lower where healthy scans need it (0: too few scans)."""
        k = math.floor(_check_rate(q) * (self.n_scans + 1) + 1e-9)  # 0.05 * 20 must count as 1
        if k < 1 or self.n_scans < 2:
            return 0.0
        return min(q, float(np.nextafter(self.simes_statistics[k - 1], 0.0)))

    def flag(self, pvalues: np.ndarray, q: float) -> np.ndarray:
        """Which of one scan's brain-voxel p-values pass BH at :meth:`fdr_level` ``(q)``."""
        return benjamini_hochberg(pvalues, self.fdr_level(q))

    def pvalue_map(self, scores: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """Voxel p-values of one scan's brain voxels, 1 outside the brain (float32, ``scores``' shape)."""
        brain = np.asarray(brain, dtype=bool)
        pvalues = np.ones(brain.shape, dtype=np.float32)
        pvalues[brain] = self.voxel_pvalues(np.asarray(scores)[brain])
        return pvalues

    def flag_map(self, pvalue_map: np.ndarray, brain: np.ndarray, q: float) -> np.ndarray:
        """Brain voxels of one scan's :meth:`pvalue_map` that pass BH at :meth:`fdr_level` ``(q)`` (boolean)."""
        brain = np.asarray(brain, dtype=bool)
        mask = np.zeros(brain.shape, dtype=bool)
        mask[brain] = self.flag(np.asarray(pvalue_map)[brain], q)
        return mask

    def fdr_mask(self, scores: np.ndarray, brain: np.ndarray, q: float) -> np.ndarray:
        """Brain voxels of one scan flagged at false discovery rate ``q`` (boolean, ``scores``' shape)."""
        return self.flag_map(self.pvalue_map(scores, brain), brain, q)

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able record."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_sha256": self.model_sha256,
            "n_scans": self.n_scans,
            "n_voxels": self.n_voxels,
            "volume_scores": self.volume_scores.tolist(),
            "voxel_scores": self.voxel_scores.tolist(),
            "voxel_at_least": self.voxel_at_least.tolist(),
            "voxel_above": self.voxel_above.tolist(),
            "simes_statistics": self.simes_statistics.tolist(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as strict JSON (atomically: an existing file is replaced whole)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), allow_nan=False))
        return path

    @classmethod
    def from_dict(cls, record: object, source: str | os.PathLike = "calibration") -> ConformalCalibration:
        """Rebuild from :meth:`to_dict` output, checking every field.

        Raises:
            CalibrationError: Unknown format or version, missing or extra keys, wrong types, non-finite
                or unordered scores, counts that contradict each other.
        """

        def fail(problem: str) -> CalibrationError:
            return CalibrationError(f"{source}: {problem}")

        keys = {"format", "version", "model_sha256", "n_scans", "n_voxels", "volume_scores", "voxel_scores",
                "voxel_at_least", "voxel_above", "simes_statistics"}  # fmt: skip
        if not isinstance(record, dict) or set(record) != keys:
            raise fail(f"not a calibration record (expected the keys {sorted(keys)})")
        if record["format"] != FORMAT or record["version"] != VERSION:
            raise fail(f"format {record['format']!r} version {record['version']!r} is not {FORMAT!r} {VERSION}")
        digest = record["model_sha256"]
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise fail("model_sha256 is not a SHA-256 hex digest")
        n_voxels, n_scans = record["n_voxels"], record["n_scans"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_voxels, n_scans)):
            raise fail("n_voxels and n_scans must be positive integers")

        def numbers(name: str, integer: bool = False) -> np.ndarray:
            values = record[name]
            kinds = (int,) if integer else (int, float)
            if not isinstance(values, list) or not values or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
                raise fail(f"{name} must be a non-empty list of numbers")
            array = np.asarray(values, dtype=np.int64 if integer else np.float64)
            if not np.isfinite(array).all():
                raise fail(f"{name} holds a value that is not finite")
            return array

        volumes, scores = numbers("volume_scores"), numbers("voxel_scores")
        at_least, above = numbers("voxel_at_least", integer=True), numbers("voxel_above", integer=True)
        if volumes.size != n_scans or np.any(np.diff(volumes) < 0):
            raise fail("volume_scores must hold n_scans scores in increasing order")
        simes = numbers("simes_statistics")
        if simes.size != n_scans or np.any(np.diff(simes) < 0) or np.any((simes <= 0) | (simes > 1)):
            raise fail("simes_statistics must hold one statistic in (0, 1] per scan, in increasing order")
        if not (scores.size == at_least.size == above.size) or np.any(np.diff(scores) <= 0):
            raise fail("voxel_scores must be strictly increasing, with one count of each kind per score")
        if np.any(above < 0) or np.any(at_least <= above) or np.any(at_least > n_voxels) or np.any(np.diff(at_least) >= 0):
            raise fail("voxel counts contradict each other or n_voxels")
        return cls(scores, at_least, above, n_voxels, volumes, simes, digest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConformalCalibration:
        """Read and check a calibration file written by :meth:`save`.

        Raises:
            CalibrationError: Missing, oversized, not strict JSON, or not a valid calibration record.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"{path}: calibration file does not exist"
            raise CalibrationError(msg)
        if path.stat().st_size > MAX_FILE_BYTES:
            msg = f"{path}: calibration file larger than {MAX_FILE_BYTES // 2**20} MiB"
            raise CalibrationError(msg)

        def refuse(constant: str) -> None:
            msg = f"{path}: not strict JSON ({constant})"
            raise CalibrationError(msg)

        try:
            record = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            msg = f"{path}: not a JSON calibration file ({error})"
            raise CalibrationError(msg) from error
        return cls.from_dict(record, source=path)
