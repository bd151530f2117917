"""Makes simpleslicenet's models and datamodules visible to anomalib by short name.

A one-line ``.pth`` file installed beside the package imports this module at interpreter start-up.
It only installs an import hook (microseconds, imports nothing heavy): the moment ``anomalib.models``
finishes loading in any process — ``anomalib train``, ``anomalib benchmark``, a notebook — the hook
calls :func:`simpleslicenet.plugin.register`, which adds our classes to ``anomalib.models`` and
``anomalib.data``. Processes that never import anomalib pay nothing. Set ``SIMPLESLICENET_NO_PLUGIN=1``
to switch it off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

__all__ = ["install"]

_TRIGGER = "anomalib.models"


class _RegisterAfterAnomalibModels(importlib.abc.MetaPathFinder):
    """Finds ``anomalib.models`` with the normal finders and runs the registration after it executes."""

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

        def exec_module(module) -> None:  # noqa: ANN001
            original_exec(module)
            from simpleslicenet.plugin import register

            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Install the hook (idempotent); register at once if anomalib.models is already loaded."""
    if os.environ.get("SIMPLESLICENET_NO_PLUGIN"):
        return
    if _TRIGGER in sys.modules:
        from simpleslicenet.plugin import register

        register()
        return
    if not any(isinstance(f, _RegisterAfterAnomalibModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterAnomalibModels())


install()
