"""Registration touches only the anomalib command line: importing anomalib elsewhere changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_process() -> list[str]:
    """One new interpreter: what importing anomalib loads, then what ``register()`` makes known (printed lines)."""
    code = (
        "import sys, anomalib.models, anomalib.data\n"
        "print(hasattr(anomalib.models, 'SimpleSliceNet'), hasattr(anomalib.data, 'BrainPhantom'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('simpleslicenet.') and m != 'simpleslicenet._anomalib_hook'))\n"
        "import simpleslicenet; simpleslicenet.register()\n"
        "from anomalib.models import get_model; from anomalib.data import get_datamodule\n"
        "print(type(get_model('SimpleSliceNet')).__name__, anomalib.models.PatchcoreSlices.__name__)\n"
        "print(type(get_datamodule({'class_path': 'BrainPhantom', 'init_args': {'root': '.'}})).__name__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.splitlines()


def test_importing_anomalib_loads_nothing_of_ours(fresh_process: list[str]) -> None:
    # The start-up hook imports nothing of the package beyond itself, the version string and its
    # standard-library warning filters (no model, no allocator change).
    assert fresh_process[0] == "False False"
    assert fresh_process[1] == "['simpleslicenet._version', 'simpleslicenet.quiet']"


def test_register_makes_short_names_known_to_anomalib(fresh_process: list[str]) -> None:
    assert " ".join(fresh_process[2:]).split() == ["SimpleSliceNet", "PatchcoreSlices", "BrainPhantom"]


def test_cli_seed_true_draws_a_fresh_seed_and_an_integer_is_kept() -> None:
    from simpleslicenet.plugin import _adjust_before_instantiation

    class FakeCLI:
        def __init__(self, seed: object) -> None:
            self.config = {"subcommand": "fit", "fit": {"seed_everything": seed}}

        def before_instantiate_classes(self) -> None:
            pass

    _adjust_before_instantiation(FakeCLI)
    drawn = []
    for _ in range(3):
        cli = FakeCLI(True)
        cli.before_instantiate_classes()
        drawn.append(cli.config["fit"]["seed_everything"])
    assert all(isinstance(seed, int) for seed in drawn) and len(set(drawn)) == 3  # not Lightning's fixed 0
    cli = FakeCLI(5)
    cli.before_instantiate_classes()
    assert cli.config["fit"]["seed_everything"] == 5


def test_default_logger_only_for_our_runs_and_never_over_the_users_choice() -> None:
    from jsonargparse import Namespace

    from simpleslicenet.plugin import default_logger_wanted

    def config(logger: object, model: str = "simpleslicenet.models.simpleslicenet.SimpleSliceNet") -> Namespace:
        return Namespace(
            trainer=Namespace(logger=logger),
            model=Namespace(class_path=model),
            data=Namespace(class_path="anomalib.data.MVTecAD"),
        )

    assert default_logger_wanted(config(None))
    assert not default_logger_wanted(config(False))  # --trainer.logger false still means none
    assert not default_logger_wanted(config(Namespace(class_path="lightning.pytorch.loggers.CSVLogger")))
    assert not default_logger_wanted(config(None, model="anomalib.models.Patchcore"))  # anomalib's run, its defaults


def test_one_console_handler_keeps_the_plain_one() -> None:
    import logging

    from rich.logging import RichHandler

    from simpleslicenet.plugin import use_one_console_handler

    root = logging.getLogger()
    saved = list(root.handlers)
    plain, rich = logging.StreamHandler(), RichHandler()
    try:
        root.handlers = [plain, rich]  # what anomalib's configure_logger leaves
        use_one_console_handler()
        assert root.handlers == [plain]
        root.handlers = [rich]  # rich alone is left as it is
        use_one_console_handler()
        assert root.handlers == [rich]
    finally:
        root.handlers = saved
