"""Filters for third-party output that is not the user's business, each as narrow as one message.

Imported by the start-up hook (so it stays light: no import beyond the standard library at module level),
the plugin, the sweep's runs and EDC training.
"""

from __future__ import annotations

import warnings

__all__ = ["quiet_lightning_messages", "quiet_third_party_warnings"]

# (category, message start, module of the line that warns): each one exactly, nothing broader.
_THIRD_PARTY_WARNINGS = (
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated", r"timm\.models\.layers"),
    (FutureWarning, r"The anomalib\.models\.components\.dinov2 package is deprecated", r"anomalib\."),
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)


def quiet_third_party_warnings() -> None:
    """Ignore the listed deprecation warnings that third-party imports raise about their own code."""
    for category, message, module in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# Lightning's rank-zero messages go through whichever of these loggers its packages imported last.
_RANK_ZERO_LOGGERS = tuple(
    f"{package}.utilities.rank_zero"
    for package in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
)
_LIGHTNING_NOISE = (
    "💡 Tip: For seamless cloud logging",  # an advertisement, printed by every Trainer
    # anomalib's models return the callbacks its Engine also passes: nothing the user can act on.
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",
)


def _not_lightning_noise(record) -> bool:  # noqa: ANN001
    return not str(record.getMessage()).startswith(_LIGHTNING_NOISE)


def quiet_lightning_messages() -> None:
    """Drop Lightning's cloud-logger advertisement and its callback-override notice from the console."""
    import logging  # not at the top: this module is imported by every interpreter start-up

    for name in _RANK_ZERO_LOGGERS:
        target = logging.getLogger(name)
        if _not_lightning_noise not in target.filters:
            target.addFilter(_not_lightning_noise)
