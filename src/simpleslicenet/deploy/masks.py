"""How ``predict`` decides what to flag in each scan: a score threshold, or an FDR against a calibration.

* **A score threshold** (``--threshold``): voxels whose score reaches it inside the brain (the rule the
  Dice metrics use, :func:`simpleslicenet.scan_outputs.threshold_mask`); ``"val"`` takes the threshold
  that maximised Dice on the validation split during training, stored in the model file.
* **A calibration** (``--calibration``, from ``simpleslicenet calibrate`` on healthy scans of this very
  model): voxel p-values for every scan, and with ``--fdr`` the mask of voxels that pass
  Benjamini–Hochberg (:mod:`simpleslicenet.calibration`), at a lower level where the calibration scans
  need it.

Every option is checked before the first scan is read (:meth:`MaskRule.from_options`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simpleslicenet.calibration import CalibrationError, ConformalCalibration, model_digest
from simpleslicenet.scan_outputs import threshold_mask

__all__ = ["MaskRule"]


def _load_calibration(path: str | os.PathLike, model: str | os.PathLike) -> ConformalCalibration:
    calibration = ConformalCalibration.load(path)
    if calibration.model_sha256 is not None and calibration.model_sha256 != model_digest(model):
        msg = f"{path}: was made with another model than {model}; calibrate this model on healthy scans"
        raise CalibrationError(msg)
    return calibration


@dataclass(frozen=True)
class MaskRule:
    """What ``predict`` writes beside each map: voxel p-values (with a calibration) and a mask.

    Args:
        threshold: Score threshold of the mask; ``"val"`` until :meth:`resolved`; ``None``: none.
        calibration: The model's calibration, or ``None``.
        calibration_path: The file it came from.
        fdr: False discovery rate of the mask (with a calibration), or ``None``.
        fdr_level: The Benjamini–Hochberg level actually used for ``fdr``.
    """

    threshold: float | str | None = None
    calibration: ConformalCalibration | None = None
    calibration_path: str | None = None
    fdr: float | None = None
    fdr_level: float | None = None

    @classmethod
    def from_options(
        cls,
        model: str | os.PathLike,
        threshold: float | str | None = None,
        calibration: str | os.PathLike | None = None,
        fdr: float | None = None,
    ) -> MaskRule:
        """Check the command's options against each other and the calibration file, before any scan is read.

        Args:
            model: The model file (a calibration must have been made with it).
            threshold: A score, ``"val"`` or ``None``.
            calibration: A calibration file of ``model``, or ``None``.
            fdr: A false discovery rate for the mask (needs ``calibration``), or ``None``.

        Raises:
            ValueError: Both a threshold and an FDR, or an FDR outside (0, 1).
            CalibrationError: An unusable calibration file, one made with another model, an FDR without
                one, or too few calibration scans for the FDR.
        """
        if fdr is not None and threshold is not None:
            msg = "give a score threshold or a false discovery rate for the mask, not both"
            raise ValueError(msg)
        if calibration is None:
            if fdr is not None:
                msg = "--fdr needs a calibration (--calibration FILE, from simpleslicenet calibrate on healthy scans)"
                raise CalibrationError(msg)
            return cls(threshold=threshold)
        loaded = _load_calibration(calibration, model)
        level = None
        if fdr is not None:
            level = loaded.fdr_level(fdr)  # refuses a rate outside (0, 1)
            if level == 0:
                needed = math.ceil(1 / fdr - 1 - 1e-9)
                msg = (
                    f"{calibration}: {loaded.n_scans} calibration scans cannot give a mask at FDR {fdr} "
                    f"(needs {needed})"
                )
                raise CalibrationError(msg)
        return cls(threshold=threshold, calibration=loaded, calibration_path=str(calibration), fdr=fdr, fdr_level=level)

    def resolved(self, metadata: dict[str, Any], model: object) -> MaskRule:
        """This rule with ``"val"`` replaced by the model's validation threshold (from its metadata).

        Raises:
            ValueError: ``"val"`` for a model that holds no validation threshold.
        """
        threshold = self.threshold
        if threshold == "val":
            threshold = metadata.get("dice_threshold")
            if threshold is None:
                msg = f"{model}: holds no validation threshold (trained without a validation split); pass a number"
                raise ValueError(msg)
        return replace(self, threshold=None if threshold is None else float(threshold))

    def settings(self) -> dict[str, Any]:
        """The rule as ``scores.json`` records it."""
        return {
            "threshold": self.threshold,
            "fdr": self.fdr,
            # The BH level actually used (lower than fdr where the calibration scans need it).
            "fdr_level": self.fdr_level,
            "calibration": self.calibration_path,
        }

    def apply(self, model_map: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One scan's model-grid mask and voxel p-values (``None`` where the rule asks for neither)."""
        brain = np.asarray(brain, dtype=bool)
        pvalues = None if self.calibration is None else self.calibration.pvalue_map(model_map, brain)
        if self.fdr is not None:
            return self.calibration.flag_map(pvalues, brain, self.fdr), pvalues
        if self.threshold is not None:
            return threshold_mask(model_map, float(self.threshold), brain), pvalues
        return None, pvalues
