"""Built-in brain MRI phantom: the default dataset, generated locally with exact ground truth.

Healthy anatomy comes from the MNI152 2009a grey-matter, white-matter and brain maps that ship inside
nilearn (no download). Each subject warps them with a small random affine and a smooth non-linear
deformation, mixes tissue intensities of the chosen contrast (T1, T1ce, T2 or FLAIR) with partial
voluming, and adds a smooth bias field and Rician noise. Lesion subjects carry 1–3 irregular
tumour-like lesions (core, necrosis, oedema) with mass effect; their whole extent is the mask.

The dataset is written like BraTS (one folder per subject, ``{id}_{contrast}.nii.gz``,
``{id}_seg.nii.gz``, ``{id}_brainmask.nii.gz``) with a ``manifest.json`` that records every parameter,
so a folder is reused whenever it already holds the requested phantom. :func:`write_phantom_bids` writes
it as a BIDS dataset instead (``participants.tsv`` groups, masks as a derivatives dataset).

Example:
    >>> from simpleslicenet.data.phantom import generate_phantom_dataset
    >>> root = generate_phantom_dataset("datasets/phantom", n_healthy=4, n_lesion=4, spacing_mm=4.0)  # doctest: +SKIP
    >>> sorted(p.name for p in (root / "Phantom_00004").iterdir())  # doctest: +SKIP
    ['Phantom_00004_brainmask.nii.gz', 'Phantom_00004_seg.nii.gz', 'Phantom_00004_t2.nii.gz']
"""

from simpleslicenet.data.phantom.bids import write_phantom_bids
from simpleslicenet.data.phantom.contrasts import CONTRASTS
from simpleslicenet.data.phantom.dataset import (
    MANIFEST_NAME,
    generate_phantom_dataset,
    read_manifest,
    subject_files,
    subject_id,
    write_subject,
)
from simpleslicenet.data.phantom.generator import PhantomOptions, PhantomSubject, generate_subject
from simpleslicenet.data.phantom.lesions import LesionOptions
from simpleslicenet.data.phantom.templates import load_tissue_template

__all__ = [
    "CONTRASTS",
    "MANIFEST_NAME",
    "LesionOptions",
    "PhantomOptions",
    "PhantomSubject",
    "generate_phantom_dataset",
    "generate_subject",
    "load_tissue_template",
    "read_manifest",
    "save_montage",
    "subject_files",
    "subject_id",
    "write_phantom_bids",
    "write_subject",
]


def __getattr__(name: str):  # noqa: ANN202
    # Loaded on demand: the montage module doubles as a script (python -m ...montage) and needs matplotlib.
    if name == "save_montage":
        from simpleslicenet.data.phantom.montage import save_montage

        return save_montage
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
