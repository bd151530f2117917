"""BrainPhantom: the built-in synthetic brain MRI dataset, generated on first use (no download).

Healthy subjects are split by whole subject into training and normal test volumes; every lesion subject
is a test volume, and the base class carves the validation split (healthy and lesion volumes alike)
out of the test volumes. See :mod:`simpleslicenet.data.phantom` for how subjects are made.

Example:
    >>> from simpleslicenet.data.datamodules.phantom import BrainPhantom
    >>> datamodule = BrainPhantom(n_healthy=6, n_lesion=4, spacing_mm=4.0, target_shape=(32, 32, 16))
    >>> datamodule.prepare_data()  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
    >>> batch = next(iter(datamodule.train_dataloader()))  # doctest: +SKIP
    >>> batch.image.shape  # doctest: +SKIP
    torch.Size([16, 3, 32, 32])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd

from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.phantom import PhantomOptions, generate_phantom_dataset, read_manifest, subject_files
from simpleslicenet.data.phantom.contrasts import check_contrast
from simpleslicenet.data.phantom.lesions import check_families

__all__ = ["BrainPhantom", "default_cache_dir"]

CACHE_ENV = "SIMPLESLICENET_CACHE"


def default_cache_dir() -> Path:
    """Where generated data lives: ``$SIMPLESLICENET_CACHE`` or ``~/.cache/simpleslicenet``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "simpleslicenet").expanduser()


class BrainPhantom(VolumeDataModule):
    """Synthetic brain MRI with tumour-like lesions and exact masks, generated locally.

    Args:
        root: Folder of the phantom. Default: ``<cache>/phantom/<modality>_<spacing>mm_seed<seed>_<n>h<m>l``
            under :func:`default_cache_dir`, so differently configured phantoms never overwrite each other.
        n_healthy: Healthy subjects; two thirds (at least one) train, the rest are normal test volumes.
        n_lesion: Lesion subjects (all test or validation volumes).
        modality: Contrast of the generated scans: ``"t1"``, ``"t1ce"``, ``"t2"`` or ``"flair"``.
        seed: Seed of the phantom and of the splits.
        spacing_mm: Voxel size the volumes are generated at (2 mm: 99×117×95 voxels); recorded with the
            model like any datamodule's spacing, so a trained model resamples new scans to it.
        target_shape: Model grid ``(x, y, z)``; the default suits 2 mm volumes and quick runs. It holds
            every generated brain in-plane (the largest the sweeps meet spans 82×101 voxels at 2 mm): a
            grid that cuts the brain leaves a straight tissue edge that scores as anomalous.
        train_fraction: Share of healthy subjects used for training.
        test_site: Another site for the test scans: :class:`~simpleslicenet.data.phantom.PhantomOptions`
            fields that differ from the generator's defaults there (e.g. ``{"deformation_mm": 6.0,
            "bias_strength": 0.35, "noise": [0.03, 0.05]}``). The test volumes are then a second phantom
            (seed ``seed + 1``, as many subjects, generated beside ``root``), and validation keeps every
            non-training volume of the training site, so thresholds are chosen where the model was trained.
            ``None``: one site.
        lesion_families: Lesion families of the lesion subjects, taken in turn: ``"tumour"`` (1–3
            tumours with oedema and mass effect), ``"small"`` (one of about 1–4 cm³), ``"multifocal"``
            (4–10 MS-like white-matter foci of 3–10 mm), ``"hypointense"`` (stroke-like, darker than
            the tissue). Each test volume's family and lesion volume are in the ``lesion_family``
            and ``lesion_volume_ml`` columns of its samples.
        progress: Show a progress bar while generating.
        **kwargs: The other :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments
            (``intensity``, ``brain_mask``: the generated masks by default, ``val_fraction``, loaders).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        n_healthy: int = 24,
        n_lesion: int = 16,
        modality: str = "t2",
        seed: int = 0,
        spacing_mm: float = 2.0,
        target_shape: tuple[int, int, int] = (96, 104, 48),
        train_fraction: float = 2 / 3,
        lesion_families: Sequence[str] = ("tumour",),
        test_site: dict | None = None,
        progress: bool = True,
        **kwargs,
    ) -> None:
        modality = check_contrast(modality)
        families = check_families(lesion_families)
        if n_healthy < 2:
            msg = f"BrainPhantom needs at least 2 healthy subjects (training and normal test), got {n_healthy}"
            raise ValueError(msg)
        if n_lesion < 1:
            msg = f"BrainPhantom needs at least 1 lesion subject, got {n_lesion}"
            raise ValueError(msg)
        if not 0.0 < train_fraction < 1.0:
            msg = f"train_fraction must lie strictly between 0 and 1, got {train_fraction}"
            raise ValueError(msg)
        if root is None:
            tag = f"{modality}_{spacing_mm:g}mm_seed{seed}_{n_healthy}h{n_lesion}l"
            if families != ("tumour",):
                tag += "_" + "-".join(families)
            root = default_cache_dir() / "phantom" / tag
        super().__init__(
            root=root, target_shape=target_shape, spacing_mm=spacing_mm, modality=modality, seed=seed, **kwargs
        )
        self.n_healthy = int(n_healthy)
        self.n_lesion = int(n_lesion)
        self.train_fraction = float(train_fraction)
        self.lesion_families = families
        self.test_site = _site_options(test_site)
        self.progress = progress
        self.category = f"phantom_{modality}"

    @property
    def test_site_root(self) -> Path | None:
        """Folder of the test site's phantom (beside ``root``), or ``None`` without a test site."""
        if self.test_site is None:
            return None
        digest = hashlib.sha256(json.dumps(asdict(self.test_site), sort_keys=True).encode()).hexdigest()[:8]
        return self.root.with_name(f"{self.root.name}_site-{digest}")

    def prepare_data(self) -> None:
        """Generate the phantom (and the test site's) unless their folders already hold these exact ones."""
        sites = [(self.root, self.seed, None)]
        if self.test_site is not None:
            sites.append((self.test_site_root, self.seed + 1, self.test_site))
        for root, seed, options in sites:
            generate_phantom_dataset(
                root,
                n_healthy=self.n_healthy,
                n_lesion=self.n_lesion,
                contrast=self.preprocessing.modality,
                seed=seed,
                spacing_mm=self.preprocessing.spacing_mm,
                options=options,
                progress=self.progress,
                lesion_families=self.lesion_families,
            )

    def make_samples(self) -> pd.DataFrame:
        """One row per subject: healthy ones split train / test by whole subject, lesion ones test.

        With a test site, the training site's non-training subjects are the validation volumes and the
        test site's subjects the test volumes.
        """
        # setup() may run without prepare_data() (e.g. a fresh process); generation is a no-op when done.
        self.prepare_data()
        samples = self._site_samples(self.root, self.seed)
        if self.test_site is None:
            return samples
        samples.loc[samples["split"] == "test", "split"] = "val"
        tested = self._site_samples(self.test_site_root, self.seed + 1)
        tested["split"] = "test"
        tested["volume_id"] = "site-" + tested["volume_id"]
        return pd.concat([samples, tested], ignore_index=True)

    def _site_samples(self, root: Path, seed: int) -> pd.DataFrame:
        manifest = read_manifest(root)
        if manifest is None:
            msg = f"{root}: no phantom manifest after generation"
            raise RuntimeError(msg)
        healthy = [entry["index"] for entry in manifest["subjects"] if entry["label"] == "healthy"]
        n_train = min(max(int(round(len(healthy) * self.train_fraction)), 1), len(healthy) - 1)
        rng = np.random.default_rng(seed)
        train = {int(i) for i in rng.choice(healthy, size=n_train, replace=False)}
        rows = []
        for entry in manifest["subjects"]:
            files = subject_files(root, entry["index"], self.preprocessing.modality)
            is_lesion = entry["label"] == "lesion"
            rows.append(
                {
                    "volume_id": entry["id"],
                    "image_path": str(files["image"]),
                    "mask_path": str(files["seg"]),
                    "brain_mask_path": str(files["brainmask"]),
                    "label_index": int(is_lesion),
                    "split": "train" if entry["index"] in train else "test",
                    # Manifests written before families existed hold tumours only.
                    "lesion_family": (entry.get("family") or "tumour") if is_lesion else "none",
                    "lesion_volume_ml": float(entry.get("lesion_volume_ml", 0.0)),
                }
            )
        return pd.DataFrame(rows)


def _site_options(overrides: dict | None) -> PhantomOptions | None:
    """The generator's options with ``overrides`` (a test site), checked by name."""
    if overrides is None:
        return None
    known = {item.name for item in fields(PhantomOptions)} - {"lesions"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        msg = f"test_site: unknown generator settings {unknown}; known: {sorted(known)}"
        raise ValueError(msg)
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items()}
    return PhantomOptions(**values)
