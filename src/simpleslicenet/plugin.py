"""Registration of simpleslicenet's classes with anomalib, so that short names work everywhere.

anomalib's command line resolves ``--model NAME`` / ``--data NAME`` among classes that are already
imported, and ``get_model``, ``get_datamodule`` and ``anomalib benchmark`` look at the attributes of
``anomalib.models`` and ``anomalib.data``. :func:`register` imports every class of the model table
(:data:`simpleslicenet.models.registry.MODELS`) and every datamodule, and sets them there. It runs by
itself only in the ``anomalib`` and ``simpleslicenet`` commands (see :mod:`simpleslicenet._anomalib_hook`);
in Python, call it before using anomalib's by-name lookups.

It also adjusts the command line's runs, before their classes are instantiated:

* ``--seed_everything`` works: anomalib's command line accepts the option but never seeds, so two runs
  with the same seed trained different models. The seed is set as Lightning's own CLI sets it (a random
  seed, logged, when none is given).
* A run of one of this package's models or datamodules gets Lightning's default logger
  (``--trainer.logger true``: TensorBoard if installed, else CSV) when the user names none, so its loss and
  validation curves lie in the run's folder (``lightning_logs/version_0``), logged at every step unless
  ``--trainer.log_every_n_steps`` says otherwise; ``--trainer.logger false`` still means no logger.
* Each log line is printed once: anomalib's ``configure_logger`` gives the root logger a plain and a rich
  console handler, which print every message twice; the plain one is kept. Lightning's cloud-logger
  advertisement, its callback-override notice and its warning about the frozen backbone's eval mode are
  left out, and so are third-party deprecation warnings about their own code
  (:func:`~simpleslicenet.quiet.quiet_third_party_warnings`).

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
import warnings
from typing import Any

from simpleslicenet.quiet import quiet_lightning_messages
from simpleslicenet.data import datamodules
from simpleslicenet.models.registry import MODELS, get_model_class

logger = logging.getLogger(__name__)

__all__ = ["register"]

_registered = False
_PACKAGE = "simpleslicenet."


def register() -> None:
    """Add simpleslicenet's models and datamodules to ``anomalib.models`` / ``anomalib.data`` (idempotent)."""
    global _registered  # noqa: PLW0603
    if _registered:
        return
    anomalib_models = importlib.import_module("anomalib.models")
    anomalib_data = importlib.import_module("anomalib.data")

    for name in MODELS:
        cls = get_model_class(name)
        setattr(anomalib_models, name, cls)
        # get_model() imports dotted class paths only from an allow-list: the defining module and its package.
        anomalib_models.ALLOWED_MODULES.update({cls.__module__, cls.__module__.rsplit(".", 1)[0]})
    for name in datamodules.__all__:
        cls = getattr(datamodules, name)
        if isinstance(cls, type) and issubclass(cls, anomalib_data.AnomalibDataModule):
            setattr(anomalib_data, name, cls)
    _adjust_before_instantiation(importlib.import_module("anomalib.cli.cli").AnomalibCLI)
    _registered = True


def _subcommand_config(cli: Any) -> Any:  # noqa: ANN401
    return cli.config.get(str(cli.config.get("subcommand")), cli.config)


def _class_path(config: Any, key: str) -> str:  # noqa: ANN401
    value = config.get(key) if hasattr(config, "get") else None
    if value is None:
        return ""
    path = value.get("class_path", "") if hasattr(value, "get") else value
    return str(path or "")


def _runs_our_classes(config: Any) -> bool:  # noqa: ANN401
    return any(_class_path(config, key).startswith(_PACKAGE) for key in ("model", "data"))


def default_logger_wanted(config: Any) -> bool:  # noqa: ANN401
    """Whether a run's config asks for no logger at all and runs one of this package's classes.

    Args:
        config: The subcommand's config (``trainer``, ``model``, ``data`` sections).

    Returns:
        ``True`` when ``trainer.logger`` is unset (``None``) and the model or datamodule is ours;
        ``False`` for an explicit logger or ``false``, and for runs of other packages' classes.
    """
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if trainer is None or not hasattr(trainer, "get") or trainer.get("logger") is not None:
        return False
    return _runs_our_classes(config)


def use_one_console_handler() -> None:
    """Drop the rich console handler where a plain one prints the same records (root, ``lightning.pytorch``).

    anomalib's ``configure_logger`` adds both, so each message appeared twice, once plain and once
    wrapped in rich's columns. The plain one keeps one line per message, readable in log files too.
    """
    from rich.logging import RichHandler

    for name in ("", "lightning.pytorch"):
        target = logging.getLogger(name)
        plain = [h for h in target.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, RichHandler)]
        if plain:
            for handler in [h for h in target.handlers if isinstance(h, RichHandler)]:
                target.removeHandler(handler)


# Lightning warnings that are expected for our models: the frozen backbone stays in eval mode on purpose,
# and the default logger falls back to CSV when TensorBoard is not installed.
_EXPECTED_LIGHTNING_WARNINGS = (
    (r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop"),
    # Warned from the line that built the Trainer, which may be anomalib's or the user's.
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", r""),
)


def _seed(config: Any) -> None:  # noqa: ANN401
    """Seed as ``--seed_everything`` says (an int, or ``true`` for a random, logged seed)."""
    from lightning.pytorch import seed_everything

    seed = config.get("seed_everything", True) if hasattr(config, "get") else True
    if seed is not False:
        if seed is True:  # Lightning's seed_everything(None) would pick 0 every time, not a fresh seed
            seed = random.SystemRandom().randrange(2**31)
            logger.info("seed_everything: %d (pass --seed_everything %d to repeat this run)", seed, seed)
        # Models draw random weights at construction, so the seed must come before it.
        config["seed_everything"] = seed_everything(int(seed), workers=True)


def _prepare_output(config: Any) -> None:  # noqa: ANN401
    """For a run of our classes: a default logger, each console message once, the expected warnings left out."""
    if not _runs_our_classes(config):
        return
    if default_logger_wanted(config):
        config["trainer"]["logger"] = True
        if config["trainer"].get("log_every_n_steps") is None:
            # Lightning's default (50) exceeds an epoch of a few dozen volumes: no training curve.
            config["trainer"]["log_every_n_steps"] = 1
    use_one_console_handler()
    for message, module in _EXPECTED_LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    quiet_lightning_messages()


def _adjust_before_instantiation(cli_class: type) -> None:
    """Make ``cli_class`` seed and prepare its output (see the module docstring) before it builds its classes."""
    original = cli_class.before_instantiate_classes
    if getattr(original, "adjusted", False):
        return

    def before_instantiate_classes(self) -> None:  # noqa: ANN001
        config = _subcommand_config(self)
        _prepare_output(config)
        _seed(config)
        original(self)

    before_instantiate_classes.adjusted = True
    cli_class.before_instantiate_classes = before_instantiate_classes
