"""Registration of simpleslicenet's classes with anomalib, so that short names work everywhere.

anomalib's command line resolves ``--model NAME`` / ``--data NAME`` among classes that are already
imported, and ``get_model``, ``get_datamodule`` and ``anomalib benchmark`` look at the attributes of
``anomalib.models`` and ``anomalib.data``. :func:`register` imports every class of the model table
(:data:`simpleslicenet.models.registry.MODELS`) and every datamodule, and sets them there. It runs by
itself only in the ``anomalib`` and ``simpleslicenet`` commands (see :mod:`simpleslicenet._anomalib_hook`);
in Python, call it before using anomalib's by-name lookups.

It also makes ``--seed_everything`` work: anomalib 2.7's command line accepts the option but never seeds,
so two runs with the same seed trained different models. :func:`register` seeds before the classes are
instantiated, as Lightning's own CLI does (a random seed, logged, when none is given).

Example:
    >>> import simpleslicenet
    >>> simpleslicenet.register()  # doctest: +SKIP
    >>> from anomalib.models import get_model
    >>> get_model("SimpleSliceNet")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import random

logger = logging.getLogger(__name__)

__all__ = ["register"]

_registered = False


def register() -> None:
    """Add simpleslicenet's models and datamodules to ``anomalib.models`` / ``anomalib.data`` (idempotent)."""
    global _registered  # noqa: PLW0603
    if _registered:
        return
    anomalib_models = importlib.import_module("anomalib.models")
    anomalib_data = importlib.import_module("anomalib.data")
    from simpleslicenet.data import datamodules
    from simpleslicenet.models.registry import MODELS, get_model_class

    for name in MODELS:
        cls = get_model_class(name)
        setattr(anomalib_models, name, cls)
        # get_model() imports dotted class paths only from an allow-list: the defining module and its package.
        anomalib_models.ALLOWED_MODULES.update({cls.__module__, cls.__module__.rsplit(".", 1)[0]})
    for name in datamodules.__all__:
        cls = getattr(datamodules, name)
        if isinstance(cls, type) and issubclass(cls, anomalib_data.AnomalibDataModule):
            setattr(anomalib_data, name, cls)
    _seed_before_instantiation(importlib.import_module("anomalib.cli.cli").AnomalibCLI)
    _registered = True


def _seed_before_instantiation(cli_class: type) -> None:
    """Make ``cli_class`` honour ``--seed_everything`` (an int, or ``true`` for a random, logged seed)."""
    original = cli_class.before_instantiate_classes
    if getattr(original, "seeds", False):
        return

    def before_instantiate_classes(self) -> None:  # noqa: ANN001
        from lightning.pytorch import seed_everything

        config = self.config.get(str(self.config.get("subcommand")), self.config)
        seed = config.get("seed_everything", True) if hasattr(config, "get") else True
        if seed is not False:
            if seed is True:  # Lightning's seed_everything(None) would pick 0 every time, not a fresh seed
                seed = random.SystemRandom().randrange(2**31)
                logger.info("seed_everything: %d (pass --seed_everything %d to repeat this run)", seed, seed)
            # Models draw random weights at construction, so the seed must come before it.
            config["seed_everything"] = seed_everything(int(seed), workers=True)
        original(self)

    before_instantiate_classes.seeds = True
    cli_class.before_instantiate_classes = before_instantiate_classes
