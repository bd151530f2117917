"""A BIDS dataset's anatomical scans, the participants chosen from ``participants.tsv``, and their masks.

A light reader of the part of BIDS this package uses, held to the rules the official validator applies
to it (no pybids needed)::

    ROOT/dataset_description.json                      required ("Name", "BIDSVersion")
    ROOT/participants.tsv                              participant_id (sub-<label>) and any columns; needed
                                                       for COLUMN=VALUE selections only
    ROOT/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_task-][_acq-][_ce-][_rec-][_run-]
        [_echo-][_part-][_chunk-]_<suffix>.nii[.gz]    the scans (e.g. ``sub-01_ses-01_T2w.nii.gz``)
    ROOT/derivatives/<pipeline>/sub-<label>/[ses-<label>/]anat/
        <source entities>[_space-<label>]_desc-lesion_mask.nii[.gz]   lesion mask of a scan
        <source entities>[_space-<label>]_desc-brain_mask.nii[.gz]    brain mask of a scan
        <source entities>[_space-<label>]_desc-preproc_<suffix>.nii[.gz]  a preprocessed scan

Every NIfTI file of the contrast read in an ``anat`` folder must be named by the BIDS schema's rule for
its suffix (the entities it allows, in BIDS order, those it requires, alphanumeric labels, the subject and
session of its folders); other anatomical files (other contrasts, file collections such as ``MP2RAGE`` or
``MEGRE``, ``defacemask``) are not read, and those that break the rules are left out with a warning.
Files and folders matched by ``.bidsignore`` are skipped, as the validator skips them. A mask belongs to
the scan with the same entities (the suffix is not part of it, so one lesion mask serves a session's T1w
and T2w alike) on the same grid: a raw scan takes masks without ``space`` and ``res`` entities, a
preprocessed scan in ``space-X`` (``res-Y``) takes masks in ``space-X`` (``res-Y``). Every problem is a
:class:`BidsError` naming the file or subject.

Example:
    >>> from simpleslicenet.data.bids import BidsDataset
    >>> dataset = BidsDataset("datasets/bids", suffix="T2w")  # doctest: +SKIP
    >>> controls = dataset.select("group=control")  # doctest: +SKIP
    >>> [scan.name for scan in dataset.scans(controls)][:2]  # doctest: +SKIP
    ['sub-01_T2w', 'sub-02_ses-01_T2w']
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from simpleslicenet.atomic import atomic_write_json, atomic_write_text
from simpleslicenet.data.nifti import NIFTI_SUFFIXES, VolumeError
from simpleslicenet.data.scans import ScanFiles, nifti_stem

__all__ = [
    "BIDS_ENTITY_ORDER",
    "ANAT_ENTITIES",
    "ANAT_SUFFIXES",
    "ANAT_RULES",
    "LESION_DESC",
    "BRAIN_DESC",
    "PREPROC_DESC",
    "BidsError",
    "BidsScan",
    "BidsDataset",
    "is_bids_dataset",
    "parse_bids_name",
    "parse_anat_name",
    "BIDS_VERSION",
    "RAW_LINK",
    "sidecar_path",
    "dataset_link",
    "bids_uri",
    "write_derivatives_description",
]

# Every entity in the order BIDS writes them (the schema's entity order, BIDS 1.10/1.11).
BIDS_ENTITY_ORDER = (
    "sub", "tpl", "ses", "cohort", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
    "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording", "chunk",
    "atlas", "seg", "scale", "res", "den", "label", "desc",
)  # fmt: skip
_COMMON = ("sub", "ses", "task", "acq", "ce", "rec")
# The schema's raw anat files: suffixes -> (entities allowed, in BIDS order; entities required besides sub).
_ANAT_RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (("T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio", "T2star", "FLASH", "PD"),
     (*_COMMON, "run", "echo", "part", "chunk"), ()),
    (("T1map", "T2map", "T2starmap", "R1map", "R2map", "R2starmap", "PDmap", "MTRmap", "MTsat", "UNIT1", "T1rho",
      "MWFmap", "MTVmap", "Chimap", "S0map", "M0map"), (*_COMMON, "run", "chunk"), ()),
    (("defacemask",), (*_COMMON, "run", "mod", "chunk"), ()),
    (("MEGRE",), (*_COMMON, "run", "echo", "part", "chunk"), ("echo",)),
    (("MESE",), (*_COMMON, "dir", "run", "echo", "part", "chunk"), ("echo",)),
    (("VFA",), (*_COMMON, "run", "echo", "flip", "part", "chunk"), ("flip",)),
    (("IRT1",), (*_COMMON, "run", "inv", "part", "chunk"), ("inv",)),
    (("MP2RAGE",), (*_COMMON, "run", "echo", "flip", "inv", "part", "chunk"), ("inv",)),
    (("MPM", "MTS"), (*_COMMON, "run", "echo", "flip", "mt", "part", "chunk"), ("flip", "mt")),
    (("MTR",), (*_COMMON, "run", "mt", "part", "chunk"), ("mt",)),
)  # fmt: skip
ANAT_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    suffix: (allowed, required) for suffixes, allowed, required in _ANAT_RULES for suffix in suffixes
}
# Entities a raw anatomical file may carry (those of every suffix), in BIDS order.
ANAT_ENTITIES = tuple(key for key in BIDS_ENTITY_ORDER if any(key in allowed for _, allowed, _ in _ANAT_RULES))
# Suffixes of anatomical files in the BIDS specification (non-parametric, parametric, file collections, masks).
ANAT_SUFFIXES = frozenset(ANAT_RULES)
# The BIDS version the files written by this package follow.
BIDS_VERSION = "1.10.0"
# Name of the raw dataset in BIDS URIs (``bids:raw:sub-01/anat/sub-01_T2w.nii.gz``), defined in DatasetLinks.
RAW_LINK = "raw"
LESION_DESC = "lesion"
BRAIN_DESC = "brain"
PREPROC_DESC = "preproc"
DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
DERIVATIVES = "derivatives"

_LABEL = re.compile(r"[a-zA-Z0-9]+")
_INDEX = re.compile(r"[0-9]+")
_INDEX_ENTITIES = ("run", "echo", "flip", "inv", "split", "chunk")
# Entities a derivative mask or preprocessed scan may add to its source's.
_DERIVED_ENTITIES = ("space", "res", "den", "desc")
_READ_DESCS = ("lesion", "brain", "preproc")


class BidsError(VolumeError):
    """A BIDS dataset that cannot be read as asked; the message names the file or subject and the problem."""


def is_bids_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``dataset_description.json`` (a BIDS dataset's root)."""
    return (Path(path) / DESCRIPTION).is_file()


def parse_bids_name(
    path: str | os.PathLike, allowed: Sequence[str] = ANAT_ENTITIES, required: Sequence[str] = ()
) -> tuple[dict[str, str], str]:
    """Entities and suffix of a BIDS file name ``key-value_key-value_suffix.nii[.gz]``.

    Args:
        path: The file.
        allowed: Entities the file may carry, in BIDS order.
        required: Entities it must carry besides ``sub``.

    Returns:
        ``(entities, suffix)``; entities in file order (which is BIDS order).

    Raises:
        BidsError: Not a NIfTI file, no ``sub`` entity first, an entity twice, unknown or out of order,
            a label that is not alphanumeric (an index that is not a number), or no suffix.
    """
    path = Path(path)
    stem = nifti_stem(path)
    if stem is None:
        raise BidsError(path, "not a NIfTI file (.nii or .nii.gz)")
    *pairs, suffix = stem.split("_")
    if not pairs or not _LABEL.fullmatch(suffix):
        raise BidsError(path, "not a BIDS name: expected sub-<label>[_<key>-<label>...]_<suffix>.nii.gz")
    entities: dict[str, str] = {}
    last = -1
    for pair in pairs:
        key, dash, value = pair.partition("-")
        if not dash:
            raise BidsError(path, f"{pair!r} is not a BIDS entity (key-label)")
        if key not in allowed:
            raise BidsError(path, f"entity {key!r} is not allowed here; allowed, in this order: {', '.join(allowed)}")
        if key in entities:
            raise BidsError(path, f"entity {key!r} appears twice")
        position = allowed.index(key)
        if position < last:
            raise BidsError(path, f"entity {key!r} is out of order; BIDS order: {', '.join(allowed)}")
        last = position
        pattern = _INDEX if key in _INDEX_ENTITIES else _LABEL
        if not pattern.fullmatch(value):
            kind = "a non-negative whole number" if key in _INDEX_ENTITIES else "letters and digits only"
            raise BidsError(path, f"label of {key!r} must be {kind}, got {value!r}")
        entities[key] = value
    if next(iter(entities)) != "sub":
        raise BidsError(path, "a BIDS file name starts with sub-<label>")
    missing = [key for key in required if key not in entities]
    if missing:
        entity = "entities" if len(missing) > 1 else "entity"
        raise BidsError(path, f"a {suffix} file needs the {entity} {', '.join(missing)}")
    return entities, suffix


def parse_anat_name(path: str | os.PathLike) -> tuple[dict[str, str], str]:
    """Entities and suffix of a raw anatomical file, held to the BIDS schema's rule for its suffix.

    Raises:
        BidsError: An unknown anatomical suffix, or a name that breaks its suffix's rule (see :func:`parse_bids_name`).
    """
    stem = nifti_stem(path) or Path(path).name
    suffix = stem.rsplit("_", 1)[-1]
    if suffix not in ANAT_RULES:
        # Parse first: a name without a suffix is reported as such.
        parse_bids_name(path, BIDS_ENTITY_ORDER)
        raise BidsError(path, f"unknown anatomical suffix {suffix!r}")
    allowed, required = ANAT_RULES[suffix]
    return parse_bids_name(path, allowed, required)


def _entity_string(entities: dict[str, str]) -> str:
    ordered = sorted(entities.items(), key=lambda item: BIDS_ENTITY_ORDER.index(item[0]))
    return "_".join(f"{key}-{value}" for key, value in ordered)


@dataclass(frozen=True)
class BidsScan:
    """One anatomical scan of a BIDS dataset and the masks found for it.

    Args:
        subject: Participant label without ``sub-`` (``"01"``).
        session: Session label without ``ses-``, or ``None``.
        entities: Entities of the source file in BIDS order (``{"sub": "01", "ses": "01"}``).
        suffix: Contrast suffix (``"T2w"``).
        image_path: The scan read: the raw file, or its preprocessed derivative.
        source_path: The raw file in the BIDS dataset it stems from.
        mask_path: Lesion mask (from a derivatives folder), if any.
        brain_mask_path: Brain mask, if any.
    """

    subject: str
    session: str | None
    # Left out of the hash (a dict has none); equal scans still hash alike, as the other fields decide.
    entities: dict[str, str] = field(hash=False)
    suffix: str
    image_path: Path
    source_path: Path
    mask_path: Path | None
    brain_mask_path: Path | None

    @property
    def name(self) -> str:
        """Name of the source file without its extension (``sub-01_ses-01_T2w``)."""
        return nifti_stem(self.source_path) or self.source_path.name

    def files(self) -> ScanFiles:
        """The scan as the datamodules and ``predict`` list scans."""
        return ScanFiles(self.name, self.image_path, self.mask_path, self.brain_mask_path)

    def derivative_name(
        self, desc: str | None, suffix: str, extension: str = ".nii.gz", space: str | None = None
    ) -> str:
        """File name of a derivative of this scan: source entities, ``space``, ``desc``, suffix, extension.

        Example: ``derivative_name("anomaly", "mask")`` -> ``sub-01_ses-01_desc-anomaly_mask.nii.gz``.
        """
        entities = dict(self.entities)
        if space is not None:
            entities["space"] = space
        if desc is not None:
            entities["desc"] = desc
        return f"{_entity_string(entities)}_{suffix}{extension}"

    def derivative_folder(self) -> Path:
        """Folder of the scan's derivatives relative to a derivatives dataset: ``sub-01/ses-01/anat``."""
        folder = Path(f"sub-{self.subject}")
        if self.session is not None:
            folder = folder / f"ses-{self.session}"
        return folder / "anat"


@dataclass(frozen=True)
class _File:
    """A named NIfTI file found in an ``anat`` folder."""

    path: Path
    entities: dict[str, str] = field(hash=False)
    suffix: str

    def source_key(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.entities.items() if k not in _DERIVED_ENTITIES)


def _read_bidsignore(root: Path) -> list[str]:
    path = root / ".bidsignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(errors="replace").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether a path relative to the root matches ``.bidsignore`` (gitignore-like globs)."""
    parts = relative.split("/")
    for pattern in patterns:
        anchored = pattern.lstrip("/")
        anchored = anchored[:-1] if anchored.endswith("/") else anchored
        if "/" in anchored:
            # A pattern with a folder matches the path or any folder above it.
            if any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), anchored) for i in range(len(parts))):
                return True
        elif any(fnmatch.fnmatchcase(part, anchored) for part in parts):
            return True
    return False


def _labelled_folders(folder: Path, key: str, ignored: Callable[[Path], bool] | None = None) -> list[tuple[str, Path]]:
    """``key-<label>`` folders directly in ``folder``, sorted, less the ``ignored``; a bad label is an error."""
    found = []
    for path in sorted(folder.glob(f"{key}-*")):
        if not path.is_dir() or (ignored is not None and ignored(path)):
            continue
        label = path.name[len(key) + 1 :]
        if not _LABEL.fullmatch(label):
            raise BidsError(path, f"folder label {label!r} must be letters and digits only")
        found.append((label, path))
    return found


def _anat_folders(root: Path, subject: str) -> list[tuple[str | None, Path]]:
    """``(session, anat folder)`` of a subject: ``sub-X/anat`` and ``sub-X/ses-Y/anat``."""
    subject_folder = root / f"sub-{subject}"
    folders: list[tuple[str | None, Path]] = []
    if (subject_folder / "anat").is_dir():
        folders.append((None, subject_folder / "anat"))
    for session, session_folder in _labelled_folders(subject_folder, "ses"):
        if (session_folder / "anat").is_dir():
            folders.append((session, session_folder / "anat"))
    return folders


def _nifti_files(folder: Path, root: Path, ignore: list[str]) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        if ignore and _ignored(path.relative_to(root).as_posix(), ignore):
            continue
        files.append(path)
    return files


def _check_folder_entities(path: Path, entities: dict[str, str], subject: str, session: str | None) -> None:
    if entities.get("sub") != subject:
        raise BidsError(path, f"file name says sub-{entities.get('sub')} but it lies in the folder sub-{subject}")
    if entities.get("ses") != session:
        where = f"the folder ses-{session}" if session is not None else "no session folder"
        said = f"ses-{entities['ses']}" if "ses" in entities else "no session"
        raise BidsError(path, f"file name says {said} but it lies in {where}")


def _read_participants(root: Path) -> pd.DataFrame | None:
    """``participants.tsv`` indexed by label (without ``sub-``), cells stripped, ``n/a`` missing; ``None``: no file."""
    path = root / PARTICIPANTS
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise BidsError(path, f"cannot be read as a tab-separated table ({error})") from None
    # Stray spaces (an editor's) must not make "control " differ from "control".
    table.columns = [str(column).strip() for column in table.columns]
    table = table.apply(lambda column: column.str.strip())
    if "participant_id" not in table.columns:
        raise BidsError(path, f"has no participant_id column (columns: {', '.join(map(str, table.columns))})")
    labels = []
    for text in table["participant_id"]:
        if not text.startswith("sub-") or not _LABEL.fullmatch(text[4:]):
            raise BidsError(path, f"participant_id {text!r} is not sub-<label> (letters and digits)")
        labels.append(text[4:])
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise BidsError(path, f"participant_id listed twice: {', '.join('sub-' + s for s in duplicated)}")
    table.index = pd.Index(labels, name="participant_id")
    table = table.drop(columns="participant_id")
    return table.where(table != "n/a")  # BIDS writes a missing value as n/a


class BidsDataset:
    """A BIDS dataset's anatomical scans of one contrast, with lesion and brain masks from its derivatives.

    Args:
        root: The BIDS dataset (holds ``dataset_description.json``).
        suffix: Contrast read (``"T2w"``, ``"T1w"``, ``"FLAIR"``, ...).
        session: Only this session (label without ``ses-``).
        acquisition: Only scans with this ``acq`` entity.
        run: Only scans with this ``run`` index.
        derivatives: Name of a pipeline folder under ``derivatives/`` whose preprocessed scans
            (``..._desc-preproc_<suffix>.nii.gz``) are read instead of the raw ones. Their masks come from
            that folder (they lie on its scans' grid), and from another folder only where ``lesion_masks``
            names one.
        lesion_masks: Where the ``*_desc-lesion_mask`` (and ``*_desc-brain_mask``) files are looked up.
            The default ``"auto"`` is the same for every reader of BIDS data in this package: with raw scans,
            every folder under ``derivatives/`` but those of preprocessed scans (holding ``*_desc-preproc_*``
            files) and ``exclude_derivatives``; with ``derivatives=NAME``, that folder only. A folder name:
            that folder (after ``derivatives``' own, whose masks come first). ``None``: no masks besides
            ``derivatives``' own. In a folder searched by ``"auto"``, masks of scans the dataset does not have
            and badly named masks are left out with a warning; in a named folder they are errors.
        space: With ``derivatives``, only preprocessed scans in this space (needed when there are several).
        exclude_derivatives: Folders under ``derivatives/`` that ``lesion_masks="auto"`` leaves out (e.g. the
            output folder of a pipeline that reads this dataset).

    Raises:
        BidsError: No ``dataset_description.json``; a bad ``participants.tsv``, or a subject folder not
            listed there; a badly named file of the contrast read; a preprocessed scan without a source
            scan; a mask without a source scan, or a badly named one, in a folder that was named; two files
            for one scan, or for one mask of a scan that is read.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        suffix: str = "T2w",
        session: str | None = None,
        acquisition: str | None = None,
        run: str | int | None = None,
        derivatives: str | None = None,
        lesion_masks: str | None = "auto",
        space: str | None = None,
        exclude_derivatives: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.suffix = str(suffix)
        self.session = None if session is None else str(session).removeprefix("ses-")
        self.acquisition = None if acquisition is None else str(acquisition).removeprefix("acq-")
        self.run = None if run is None else str(run).removeprefix("run-")
        self.derivatives = derivatives
        self.lesion_masks = lesion_masks
        self.space = space
        self.exclude_derivatives = tuple(str(name) for name in exclude_derivatives)
        if self.run is not None and not _INDEX.fullmatch(self.run):
            raise BidsError(self.root, f"run must be a whole number, got {run!r}")
        if self.suffix not in ANAT_SUFFIXES:
            msg = f"unknown anatomical suffix {self.suffix!r}: choose one of {', '.join(sorted(ANAT_SUFFIXES))}"
            raise BidsError(self.root, msg)
        if not self.root.is_dir():
            raise BidsError(self.root, "BIDS dataset folder does not exist")
        self.description = self._read_description(self.root, "not a BIDS dataset")
        self.ignore = _read_bidsignore(self.root)
        participants = _read_participants(self.root)
        self.has_participants_file = participants is not None
        if participants is None:
            # BIDS only recommends participants.tsv: without it the subject folders are the participants.
            folders = [label for label, _ in _labelled_folders(self.root, "sub", self._ignored)]
            participants = pd.DataFrame(index=pd.Index(folders, name="participant_id"))
        self.participants = participants
        self.subjects = self._check_subjects()
        # Every raw anatomical file (any suffix), checked; the chosen contrast's are the candidate scans.
        self._raw = {subject: self._raw_files(subject) for subject in self.subjects}
        # Each derivatives folder is listed once: with derivatives=NAME both the masks and the scans are read from it.
        self._listings: dict[tuple[Path, bool], list[tuple[str | None, _File]]] = {}
        self._scans = self._find_scans()

    # -- reading ---------------------------------------------------------------------------------

    @staticmethod
    def _read_description(root: Path, what: str) -> dict:
        path = root / DESCRIPTION
        if not path.is_file():
            raise BidsError(root, f"{what}: no {DESCRIPTION}")
        try:
            description = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise BidsError(path, f"not valid JSON ({error})") from None
        if not isinstance(description, dict):
            raise BidsError(path, "must hold a JSON object")
        missing = [key for key in ("Name", "BIDSVersion") if key not in description]
        if missing:
            raise BidsError(path, f"lacks the required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        return description

    def _check_subjects(self) -> list[str]:
        folders = [label for label, _ in _labelled_folders(self.root, "sub", self._ignored)]
        listed = set(self.participants.index)
        missing = [label for label in folders if label not in listed]
        if missing:
            subjects = ", ".join(f"sub-{label}" for label in missing)
            plural = "s" if len(missing) > 1 else ""
            raise BidsError(self.root / PARTICIPANTS, f"does not list the subject folder{plural} {subjects}")
        without_folder = sorted(listed - set(folders))
        if without_folder:
            subjects = ", ".join(f"sub-{label}" for label in without_folder)
            warnings.warn(f"{self.root / PARTICIPANTS}: no folder for {subjects}; left out", stacklevel=3)
        return folders

    def _ignored(self, path: Path) -> bool:
        return bool(self.ignore) and _ignored(path.relative_to(self.root).as_posix(), self.ignore)

    def _raw_files(self, subject: str) -> list[_File]:
        """A subject's raw anatomical files; those of the chosen suffix must be well named, others are skipped."""
        files, skipped = [], []
        for session, folder in _anat_folders(self.root, subject):
            for path in _nifti_files(folder, self.root, self.ignore):
                try:
                    entities, suffix = parse_anat_name(path)
                    _check_folder_entities(path, entities, subject, session)
                except BidsError as error:
                    stem = nifti_stem(path) or path.name
                    if stem.rsplit("_", 1)[-1] == self.suffix:
                        raise
                    skipped.append(str(error))  # another contrast's file: not read, so not fatal
                    continue
                files.append(_File(path, entities, suffix))
        if skipped:
            warnings.warn(f"files that break the BIDS naming rules, left out: {'; '.join(skipped)}", stacklevel=4)
        seen: dict[tuple, Path] = {}
        for file in files:
            key = (file.source_key(), file.suffix)
            if key in seen:
                raise BidsError(file.path, f"the same scan twice: {seen[key].name} and {file.path.name}; keep one")
            seen[key] = file.path
        return files

    def _wanted(self, entities: dict[str, str]) -> bool:
        return (
            (self.session is None or entities.get("ses") == self.session)
            and (self.acquisition is None or entities.get("acq") == self.acquisition)
            and (self.run is None or ("run" in entities and int(entities["run"]) == int(self.run)))
        )

    def _pipeline_folders(self) -> list[tuple[Path, bool]]:
        """Derivatives folders searched for masks, in order of preference, each with whether it was named.

        With ``derivatives=NAME`` the masks come from that folder (they are on its scans' grid), and from a
        folder ``lesion_masks`` names; ``"auto"`` searches every folder only when raw scans are read.
        """
        base = self.root / DERIVATIVES
        folders: list[tuple[Path, bool]] = []
        if self.derivatives is not None:
            folders.append((base / self.derivatives, True))
        if self.lesion_masks == "auto":
            if self.derivatives is not None:
                return folders
            skip = set(self.exclude_derivatives)
            for folder in sorted(base.iterdir()) if base.is_dir() else []:
                if folder.is_dir() and not folder.name.startswith(".") and folder.name not in skip:
                    # Another folder of preprocessed scans: its masks belong to its own scans, on their grid,
                    # even where they carry no space entity.
                    if next(folder.glob(f"sub-*/**/anat/*_desc-{PREPROC_DESC}_*"), None) is None:
                        folders.append((folder, False))
        elif self.lesion_masks is not None:
            folder = base / self.lesion_masks
            if not folder.is_dir():
                raise BidsError(folder, "lesion mask folder does not exist")
            if folder not in (path for path, _ in folders):
                folders.append((folder, True))
        return folders

    def _derivative_files(self, pipeline: Path, strict: bool = True) -> list[tuple[str | None, _File]]:
        """Named NIfTI files of a derivatives folder's ``anat`` folders: ``(session, file)``.

        A badly named mask or preprocessed scan is an error in a folder that was named (``strict``), and
        left out with a warning in one searched by ``lesion_masks="auto"``.
        """
        if (pipeline, strict) in self._listings:
            return self._listings[pipeline, strict]
        found, skipped = [], []
        for label, _ in _labelled_folders(pipeline, "sub"):
            for session, folder in _anat_folders(pipeline, label):
                for path in sorted(folder.iterdir()):
                    if path.name.startswith(".") or not path.name.endswith(NIFTI_SUFFIXES):
                        continue
                    try:
                        entities, suffix = parse_bids_name(path, BIDS_ENTITY_ORDER)
                        _check_folder_entities(path, entities, label, session)
                    except BidsError as error:
                        # Other pipelines' outputs (probability maps, ...) may use names not read here;
                        # a badly named mask or preprocessed scan must not vanish silently.
                        if any(f"_desc-{desc}_" in path.name for desc in _READ_DESCS):
                            if strict:
                                raise
                            skipped.append(str(error))
                        continue
                    found.append((session, _File(path, entities, suffix)))
        if skipped:
            warnings.warn(f"{pipeline}: badly named masks left out: {'; '.join(skipped)}", stacklevel=5)
        self._listings[pipeline, strict] = found
        return found

    @staticmethod
    def _mask_key(desc: str, source: tuple, entities: dict[str, str]) -> tuple:
        """A mask slot: its kind, the source scan's entities and the grid (``space`` and ``res``)."""
        return (desc, source, entities.get("space"), entities.get("res"))

    def _masks(self) -> dict[tuple, list[Path]]:
        """``(desc, source key, space, res) -> masks``, from the folders searched, in order of preference.

        Two files for one scan in one named folder are an error here; otherwise several files for one scan
        are an error only for a scan that is read (:meth:`_mask`), unless one of them is ``derivatives=``'s.
        A mask of a scan the dataset does not have is an error in a named folder and is left out with a
        warning in one that ``lesion_masks="auto"`` searched (another tool's outputs must not make the
        dataset unreadable).
        """
        sources = {file.source_key() for files in self._raw.values() for file in files}
        masks: dict[tuple, list[Path]] = {}
        for pipeline, strict in self._pipeline_folders():
            in_pipeline: dict[tuple, list[Path]] = {}
            orphans = []
            for _, file in self._derivative_files(pipeline, strict):
                desc = file.entities.get("desc")
                if file.suffix != "mask" or desc not in (LESION_DESC, BRAIN_DESC):
                    continue
                key = self._mask_key(desc, file.source_key(), file.entities)
                if file.source_key() not in sources:
                    source = _entity_string(dict(file.source_key()))
                    problem = f"{desc} mask of a scan the dataset does not have ({source}_<suffix>.nii.gz)"
                    if strict:
                        raise BidsError(file.path, problem)
                    orphans.append(file.path.name)
                    continue
                if key in in_pipeline and strict:
                    problem = f"two {desc} masks for one scan: {in_pipeline[key][0].name} and {file.path.name}"
                    raise BidsError(file.path, problem)
                in_pipeline.setdefault(key, []).append(file.path)
            if orphans:
                msg = f"{pipeline}: masks of scans the dataset does not have, left out: {', '.join(orphans)}"
                warnings.warn(msg, stacklevel=4)
            for key, paths in in_pipeline.items():
                masks.setdefault(key, []).extend(paths)
        return masks

    def _mask(self, masks: dict[tuple, list[Path]], key: tuple) -> Path | None:
        """The one mask of a scan's slot; the ``derivatives=`` folder's own comes first."""
        found = masks.get(key, [])
        own = self.root / DERIVATIVES / str(self.derivatives) if self.derivatives is not None else None
        if len(found) > 1 and not (own is not None and found[0].is_relative_to(own)):
            folders = sorted({path.relative_to(self.root / DERIVATIVES).parts[0] for path in found})
            where = f"several derivatives folders ({', '.join(folders)})" if len(folders) > 1 else folders[0]
            msg = (
                f"{key[0]} masks for one scan in {where}: "
                f"{', '.join(map(str, found))}; name the folder to use (lesion_masks=NAME), "
                "leave the others out (exclude_derivatives=...) or keep one file"
            )
            raise BidsError(found[1], msg)
        return found[0] if found else None

    def _preprocessed(self) -> dict[tuple, _File]:
        """Preprocessed scans of the chosen contrast by source key (``derivatives=`` given)."""
        pipeline = self.root / DERIVATIVES / str(self.derivatives)
        if not pipeline.is_dir():
            raise BidsError(pipeline, f"derivatives folder {self.derivatives!r} does not exist")
        found: dict[tuple, _File] = {}
        for _, file in self._derivative_files(pipeline):
            if file.suffix != self.suffix or file.entities.get("desc") != PREPROC_DESC:
                continue
            if self.space is not None and file.entities.get("space") != self.space:
                continue
            key = file.source_key()
            if key in found:
                msg = f"two preprocessed scans of one source: {found[key].path.name} and {file.path.name}; give space="
                raise BidsError(file.path, msg)
            found[key] = file
        return found

    def _find_scans(self) -> list[BidsScan]:
        masks = self._masks()
        preprocessed = self._preprocessed() if self.derivatives is not None else None
        raw_by_key = {
            file.source_key(): file for files in self._raw.values() for file in files if file.suffix == self.suffix
        }
        if preprocessed is not None:
            orphans = [file for key, file in preprocessed.items() if key not in raw_by_key]
            if orphans:
                raise BidsError(orphans[0].path, f"preprocessed scan without a raw {self.suffix} scan in the dataset")
            missing = sorted(
                file.path.name
                for key, file in raw_by_key.items()
                if key not in preprocessed and self._wanted(file.entities)
            )
            if missing:
                pipeline = self.root / DERIVATIVES / str(self.derivatives)
                warnings.warn(f"{pipeline}: no preprocessed scan for {', '.join(missing)}; left out", stacklevel=3)
        scans = []
        for key, raw in raw_by_key.items():
            if not self._wanted(raw.entities):
                continue
            image, grid = raw.path, {}
            if preprocessed is not None:
                if key not in preprocessed:
                    continue
                image, grid = preprocessed[key].path, preprocessed[key].entities
            scans.append(
                BidsScan(
                    subject=raw.entities["sub"],
                    session=raw.entities.get("ses"),
                    entities=dict(raw.entities),
                    suffix=raw.suffix,
                    image_path=image,
                    source_path=raw.path,
                    mask_path=self._mask(masks, self._mask_key(LESION_DESC, key, grid)),
                    brain_mask_path=self._mask(masks, self._mask_key(BRAIN_DESC, key, grid)),
                )
            )
        return sorted(scans, key=lambda scan: scan.name)

    # -- choosing --------------------------------------------------------------------------------

    def select(self, spec: str | Sequence[str] | None) -> list[str]:
        """Participant labels (without ``sub-``) chosen by a selection spec, sorted.

        Args:
            spec: ``"COLUMN=VALUE[,VALUE...]"`` (rows of ``participants.tsv`` whose column holds one of the
                values; ``participant_id=sub-01,sub-02`` names participants), a list of labels with or
                without ``sub-`` (or one string of them separated by commas or spaces), or ``None`` for every
                participant with a folder.

        Raises:
            BidsError: An unknown column, a value no participant has, or a label not in ``participants.tsv``
                (the message names ``participants.tsv`` and what is missing).
        """
        path = self.root / PARTICIPANTS
        if spec is None:
            return list(self.subjects)
        if isinstance(spec, str) and "=" in spec:
            column, _, values_text = spec.partition("=")
            if not self.has_participants_file and column.strip() != "participant_id":
                raise BidsError(path, f"missing: selection {spec!r} needs participants.tsv with a column {column!r}")
            column = column.strip()
            values = [value.strip() for value in values_text.split(",") if value.strip()]
            if column == "participant_id":
                return self.select([value.removeprefix("sub-") for value in values])
            if column not in self.participants.columns:
                columns = ", ".join(map(str, self.participants.columns)) or "none besides participant_id"
                raise BidsError(path, f"has no column {column!r} (selection {spec!r}); its columns: {columns}")
            if not values:
                raise BidsError(path, f"selection {spec!r} names no value of column {column!r}")
            present = set(self.participants[column].dropna().astype(str))
            unknown = [value for value in values if value not in present]
            if unknown:
                msg = f"no participant has {column}={', '.join(unknown)} (values: {', '.join(sorted(present))})"
                raise BidsError(path, msg)
            chosen = self.participants.index[self.participants[column].isin(values)]
            return sorted(label for label in chosen if label in self.subjects)
        labels = spec.replace(",", " ").split() if isinstance(spec, str) else [str(label) for label in spec]
        labels = [label.removeprefix("sub-") for label in labels]
        unknown = [label for label in labels if label not in self.participants.index]
        if unknown and self.has_participants_file:
            raise BidsError(path, f"does not list {', '.join('sub-' + label for label in unknown)}")
        no_folder = [label for label in labels if label not in self.subjects]
        if no_folder:
            raise BidsError(self.root, f"no subject folder for {', '.join('sub-' + label for label in no_folder)}")
        return sorted(set(labels))

    def scans(self, participants: str | Sequence[str] | None = None) -> list[BidsScan]:
        """Scans of the chosen participants (a selection spec, see :meth:`select`), sorted by name.

        Participants chosen by name or by a column who have no scan of the suffix (and of the session,
        acquisition and run asked for) are named in a warning.
        """
        chosen = self.select(participants)
        scans = [scan for scan in self._scans if scan.subject in set(chosen)]
        if participants is not None:
            without = sorted(set(chosen) - {scan.subject for scan in scans})
            if without:
                filters = [f"{key}={value}" for key, value in
                           (("session", self.session), ("acquisition", self.acquisition), ("run", self.run),
                            ("derivatives", self.derivatives)) if value is not None]  # fmt: skip
                where = f" ({', '.join(filters)})" if filters else ""
                subjects = ", ".join(f"sub-{label}" for label in without)
                warnings.warn(f"{self.root}: no {self.suffix} scan{where} for the chosen {subjects}", stacklevel=2)
        return scans

    def __repr__(self) -> str:
        return f"BidsDataset({str(self.root)!r}, suffix={self.suffix!r}, scans={len(self._scans)})"


# -- writing derivatives -------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a NIfTI file: ``x.nii.gz`` or ``x.nii`` -> ``x.json``, in the same folder.

    Raises:
        ValueError: ``path`` is not a ``.nii`` or ``.nii.gz`` file.
    """
    path = Path(path)
    stem = nifti_stem(path)
    if stem is None:
        raise ValueError(f"{path}: not a NIfTI file (.nii or .nii.gz), so it has no JSON sidecar")
    return path.with_name(f"{stem}.json")


def dataset_link(folder: str | os.PathLike, root: str | os.PathLike) -> str:
    """Where the dataset ``root`` lies as seen from the derivatives dataset ``folder``: a relative path.

    This is the value of ``DatasetLinks`` and ``SourceDatasets`` (BIDS allows a local relative path):
    ``"../.."`` for ``ROOT/derivatives/NAME``. It stays right when the whole tree is moved.
    """
    relative = os.path.relpath(os.path.abspath(root), os.path.abspath(folder))
    return Path(relative).as_posix()


def bids_uri(path: str | os.PathLike, root: str | os.PathLike, link: str = RAW_LINK) -> str:
    """A file of the dataset ``root`` (its derivatives included) as a BIDS URI: ``bids:raw:sub-01/anat/x.nii.gz``.

    ``link`` names the dataset in the writing dataset's ``DatasetLinks`` (see
    :func:`write_derivatives_description`, which defines ``raw``). Paths are compared without following
    symbolic links (a DataLad dataset's files are links into its annex). A file outside ``root`` has no
    BIDS URI there: it is given as an absolute ``file:`` URI.
    """
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, os.path.abspath(root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative):
        return Path(absolute).as_uri()
    return f"bids:{link}:{Path(relative).as_posix()}"


def _generated_by(path: Path) -> list[str] | None:
    """``GeneratedBy`` names of a dataset description; ``None`` when it cannot be read as one."""
    try:
        description = json.loads(path.read_text())
        return [str(tool.get("Name")) for tool in description.get("GeneratedBy") or []]
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return None


def write_derivatives_description(
    folder: str | os.PathLike,
    name: str,
    version: str,
    source_root: str | os.PathLike,
    description: str | None = None,
    overwrite: bool = False,
    *,
    pipeline: str = "simpleslicenet",
    readme: str | None = None,
    bidsignore: Sequence[str] = (),
    code_url: str | None = None,
) -> dict:
    """Write a derivatives dataset's ``dataset_description.json``, and its ``README.md`` and ``.bidsignore``.

    The description has ``DatasetType`` ``derivative``, ``GeneratedBy`` (``pipeline``, ``version``,
    ``description``, ``code_url``), ``SourceDatasets`` and ``DatasetLinks`` (``raw``: the source dataset as a
    path relative to ``folder``, see :func:`dataset_link`; the sidecars' :func:`bids_uri` point into it). The
    source dataset's ``Authors`` are credited and its ``DatasetDOI`` recorded, where its description has them.
    ``.bidsignore`` keeps its lines and gains the missing ones of ``bidsignore``. Files are written atomically.

    Args:
        folder: The derivatives dataset (created).
        name: The dataset's ``Name``.
        version: Version of the pipeline (``GeneratedBy``).
        source_root: The BIDS dataset it derives from.
        description: What the pipeline did, in words (``GeneratedBy`` ``Description``).
        overwrite: Replace a description that another pipeline wrote (or that cannot be read).
        pipeline: ``GeneratedBy`` ``Name``; a description naming it there belongs to this pipeline.
        readme: Text of ``README.md`` (left as it is when ``None``).
        bidsignore: Lines ``.bidsignore`` must hold (files that are not BIDS files).
        code_url: ``GeneratedBy`` ``CodeURL``.

    Returns:
        The description written.

    Raises:
        FileExistsError: ``folder`` holds a ``dataset_description.json`` that does not name ``pipeline`` in
            its ``GeneratedBy`` and ``overwrite`` is false (nothing is written).
    """
    folder = Path(folder)
    path = folder / DESCRIPTION
    if path.exists() and not overwrite:
        names = _generated_by(path)
        if names is None or pipeline not in names:
            whose = "cannot be read" if names is None else f"was written by {', '.join(names) or 'another tool'}"
            msg = f"{path}: {whose}, not by {pipeline}; choose another folder (or pass overwrite to replace it)"
            raise FileExistsError(msg)
    link = dataset_link(folder, source_root)
    source: dict[str, str] = {"URL": link}
    raw_path = Path(source_root) / DESCRIPTION
    try:
        raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    if raw.get("DatasetDOI"):
        source["DOI"] = str(raw["DatasetDOI"])
    tool: dict[str, str] = {"Name": pipeline, "Version": str(version)}
    if description:
        tool["Description"] = description
    if code_url:
        tool["CodeURL"] = code_url
    content: dict = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [tool],
        "SourceDatasets": [source],
        "DatasetLinks": {RAW_LINK: link},
    }
    if raw.get("Authors"):
        content["Authors"] = raw["Authors"]  # the scans' authors, as derivatives datasets commonly credit them
    folder.mkdir(parents=True, exist_ok=True)
    if bidsignore:
        ignore_path = folder / ".bidsignore"
        lines = ignore_path.read_text().splitlines() if ignore_path.is_file() else []
        lines += [line for line in bidsignore if line not in lines]
        atomic_write_text(ignore_path, "\n".join(lines) + "\n")
    if readme is not None:
        atomic_write_text(folder / "README.md", readme)
    atomic_write_json(path, content)  # last: a folder with a description is a complete dataset
    return content
