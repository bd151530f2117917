"""Training the slice encoder itself: encoder–decoder contrast (EDC) fine-tuning on normal slices.

SimpleSliceNet and the slice-wise baselines read frozen ImageNet features. EDC (Guo et al., IEEE TMI 2023,
https://ieeexplore.ieee.org/document/10296925) fine-tunes that encoder on normal medical slices first:
a decoder rebuilds the encoder's stage maps from its bottleneck, with a stop-gradient on the encoder's
side so the pair cannot collapse. The tuned encoder is saved as a plain timm ``state_dict`` that every
model here loads with ``backbone_weights=``.

* :mod:`~simpleslicenet.training.edc`: settings and network (encoder, decoder, frozen starting copy).
* :mod:`~simpleslicenet.training.edc_module`: the Lightning module (loss, optimiser, batches per step).
* :mod:`~simpleslicenet.training.edc_run`: :func:`train_edc`, a Lightning ``Trainer`` run that resumes
  from its ``ModelCheckpoint``.
* :mod:`~simpleslicenet.training.decoder`: the reconstruction decoder.
* :mod:`~simpleslicenet.training.data`: normal slices from Br35H, image folders or datamodules.
* :mod:`~simpleslicenet.training.outputs`: weights file, checkpoint, loss curve, summary.
* :mod:`~simpleslicenet.training.command`: the ``simpleslicenet edc`` subcommand.
* :mod:`~simpleslicenet.training.selection`: checkpoint selection on validation slice AUROC (the
  authors' protocol, optimistic).

Example:
    >>> from simpleslicenet.training import EDCSettings, load_normal_slices, train_edc
    >>> slices = load_normal_slices("BrainPhantom", {"n_healthy": 24, "n_lesion": 16})  # doctest: +SKIP
    >>> train_edc(slices, "encoder.pth", EDCSettings(steps=4000))  # doctest: +SKIP

Names load on first use, so importing the package (as the command line parser does) costs nothing.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ValidationSliceAUROCCheckpoint": "simpleslicenet.training.selection",
    "EDCModule": "simpleslicenet.training.edc_module",
    "EDCNetwork": "simpleslicenet.training.edc",
    "EDCResult": "simpleslicenet.training.edc_run",
    "EDCResumeError": "simpleslicenet.training.edc",
    "EDCSettings": "simpleslicenet.training.edc",
    "global_cosine_distance": "simpleslicenet.training.edc",
    "initial_encoder_state": "simpleslicenet.training.edc",
    "train_edc": "simpleslicenet.training.edc_run",
    "FeatureDecoder": "simpleslicenet.training.decoder",
    "NormalSlices": "simpleslicenet.training.data",
    "load_normal_slices": "simpleslicenet.training.data",
    "slices_from_datamodule": "simpleslicenet.training.data",
    "slices_from_image_folder": "simpleslicenet.training.data",
    "check_encoder_weights": "simpleslicenet.training.outputs",
    "output_paths": "simpleslicenet.training.outputs",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'simpleslicenet.training' has no attribute {name!r}"
    raise AttributeError(msg)
