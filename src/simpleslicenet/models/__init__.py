"""simpleslicenet's models: SimpleSliceNet, the slice-wise baselines and the 3D autoencoder.

Every name in :data:`simpleslicenet.models.registry.MODELS` is importable from here and loads on
first use (``from simpleslicenet.models import SimpleSliceNet``).

Example:
    >>> from simpleslicenet.models import registry
    >>> registry.list_models()[:2]
    ['SimpleSliceNet', 'PatchcoreSlices']
"""

from __future__ import annotations

from simpleslicenet.models.registry import MODELS, get_model_class
from simpleslicenet.quiet import quiet_third_party_warnings

__all__ = list(MODELS)

# The models import anomalib and timm, whose imports warn about their own deprecated modules.
quiet_third_party_warnings()


def __getattr__(name: str) -> type:
    if name in MODELS:
        return get_model_class(name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
