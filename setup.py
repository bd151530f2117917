"""Ships ``simpleslicenet-anomalib.pth`` at the top of site-packages (regular and editable installs).

pyproject.toml holds all metadata; this file only adds the ``.pth`` that lets the stock ``anomalib`` CLI
resolve ``--model SimpleSliceNet`` by its short name (see ``simpleslicenet._anomalib_hook``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "src" / "pth" / "simpleslicenet-anomalib.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))


class EditableWheelWithPth(editable_wheel):
    # Editable wheels are assembled from their own staging folder, without build_py's output.
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # noqa: ANN001, ANN202
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(PTH), str(Path(unpacked_wheel) / PTH.name))
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
