"""The package works from a regular (non-editable) wheel install, not only from a source checkout.

The wheel is built from this tree and installed into a folder of its own, which is put first on
``PYTHONPATH`` so that it, not the editable checkout, is what the commands import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    completed = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, f"{' '.join(args)}\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    return completed


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """Environment whose ``simpleslicenet`` is the installed wheel, and the folder it was installed to."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so the build leaves nothing in the checkout (a stale build/ could leak into wheels).
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)], dict(os.environ), work)
    [wheel] = (work / "dist").glob("simpleslicenet-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(work / "site"), str(wheel)], dict(os.environ), work)
    env = {**os.environ, "PYTHONPATH": str(work / "site")}
    return env, work


def test_wheel_holds_the_configs_and_the_start_up_hook(wheel_env: tuple) -> None:
    env, work = wheel_env
    assert (work / "site" / "simpleslicenet-anomalib.pth").is_file()
    script = (
        "import simpleslicenet, sys; from simpleslicenet.models import registry; "
        "assert simpleslicenet.__file__.startswith(sys.argv[1]), simpleslicenet.__file__; "
        "print(sorted(registry.config_path(n).name for n in registry.list_models())); "
        "print(registry.model_defaults('SimpleSliceNet')['backbone'])"
    )
    out = _run([sys.executable, "-c", script, str(work / "site")], env, work).stdout
    assert "simpleslicenet_phantom.yaml" not in out  # only each model's own configuration is listed
    assert "'simpleslicenet.yaml'" in out and "tf_efficientnet_lite0" in out


def test_wheel_serves_the_stock_cli_short_name_and_the_sweep_command(wheel_env: tuple) -> None:
    env, work = wheel_env
    config = _run([str(BIN / "anomalib"), "train", "--model", "SimpleSliceNet", "--print_config"], env, work).stdout
    # jsonargparse prints the shortest import path of the class.
    assert "class_path: simpleslicenet.SimpleSliceNet" in config and "backbone: tf_efficientnet_lite0" in config
    usage = _run([str(BIN / "simpleslicenet"), "benchmark", "--help"], env, work).stdout
    assert "sweep YAML" in usage
