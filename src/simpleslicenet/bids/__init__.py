"""The BIDS App: ``simpleslicenet bids BIDS_DIR OUTPUT_DIR participant|group``.

* ``participant`` (:func:`run_participant`): for every selected scan of a BIDS dataset, the anomaly
  map, with a calibration the voxel p-value map, the mask (FDR or threshold), JSON sidecars holding the
  scan's whole record, and an HTML report page, written as a BIDS derivatives dataset
  (:mod:`.derivatives`); subject by subject, atomically, resumable, over local worker processes or Ray.
* ``group`` (:func:`run_group`): ``group_scores.tsv`` (one row per scan, most suspicious first) with its
  JSON sidecar, and ``group_report.html`` linking to each scan's page, from whatever scans finished.

Example:
    >>> from simpleslicenet.bids import ParticipantOptions, run_group, run_participant
    >>> options = ParticipantOptions("model.xml", calibration="calibration.json", fdr=0.05)  # doctest: +SKIP
    >>> report = run_participant("bids/", "bids/derivatives/simpleslicenet", options, workers=2)  # doctest: +SKIP
    >>> run_group("bids/", "bids/derivatives/simpleslicenet")  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["ParticipantOptions", "ParticipantReport", "run_group", "run_participant"]


def __getattr__(name: str) -> object:
    # Names load on first use: the command line builds its parser from bids.command without the models.
    if name == "run_group":
        from simpleslicenet.bids.group import run_group

        return run_group
    if name in {"ParticipantReport", "run_participant"}:
        from simpleslicenet.bids import participant

        return getattr(participant, name)
    if name == "ParticipantOptions":
        from simpleslicenet.bids.scans import ParticipantOptions

        return ParticipantOptions
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
