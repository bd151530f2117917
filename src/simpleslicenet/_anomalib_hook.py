"""Makes ``anomalib train --model SimpleSliceNet`` (and ``--data BrainPhantom``) work by short name.

A one-line ``.pth`` file installed beside the package imports this module at interpreter start-up.
It installs an import hook and nothing else (microseconds, no heavy import): only when
``anomalib.cli.cli`` finishes loading — that is, in the ``anomalib`` command — does it call
:func:`simpleslicenet.plugin.register`, before the command parses its arguments. A process that merely
imports anomalib is left alone. Set ``SIMPLESLICENET_NO_PLUGIN=1`` to switch it off.

Just before the command's module runs, :func:`simpleslicenet.quiet.quiet_third_party_warnings` filters the deprecation
warnings that anomalib's own imports raise (timm's old module path, anomalib's DINOv2 copy, Lightning's
pytree check under newer torch): they concern those libraries' code, not the user's.
"""

from __future__ import annotations

import os
import sys

from simpleslicenet.quiet import quiet_third_party_warnings

__all__ = ["install"]

_TRIGGER = "anomalib.cli.cli"

class _RegisterAfterAnomalibCli:
    """A meta-path finder: finds ``anomalib.cli.cli`` with the normal finders and registers our classes
    after it executes (a plain class: importing ``importlib.abc`` would cost every process milliseconds)."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot, and avoids finding ourselves below
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        original_exec = spec.loader.exec_module
        quiet_third_party_warnings()  # the command's module imports anomalib's models next

        def exec_module(module) -> None:  # noqa: ANN001
            original_exec(module)
            from simpleslicenet.plugin import register

            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Install the hook (idempotent); register at once if the anomalib CLI is already loaded."""
    if os.environ.get("SIMPLESLICENET_NO_PLUGIN"):
        return
    if _TRIGGER in sys.modules:
        from simpleslicenet.plugin import register

        register()
        return
    if not any(isinstance(f, _RegisterAfterAnomalibCli) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterAnomalibCli())


install()
