"""The package's layers: imports run downwards only, no package imports another that imports it back, and an
import of the package inside a function is a deliberate deferral of a heavy dependency, never a way round a cycle.

The import graph is read from the source (``ast``), so these tests import nothing of the package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "simpleslicenet"

# Lowest layer first. A module belongs to the longest prefix that names it; it may import from its own
# layer and the layers below. Models sit above what they plug into anomalib (their evaluator's metrics,
# their map writer), as anomalib's own models sit above anomalib.metrics and anomalib.visualization.
LAYERS: dict[int, tuple[str, ...]] = {
    # Core records, no package dependency beyond each other.
    1: (
        "simpleslicenet._version",
        "simpleslicenet.atomic",
        "simpleslicenet.choices",
        "simpleslicenet.executors",
        "simpleslicenet.heap",
        "simpleslicenet.records",
        "simpleslicenet.random_state",
        "simpleslicenet.quiet",
        "simpleslicenet.model_metadata",
        "simpleslicenet.data.geometry",
        "simpleslicenet.data.nifti",
        "simpleslicenet.data.volume",
        "simpleslicenet.models.scoring",
        "simpleslicenet.models.smoothing",
    ),
    # Datasets, datamodules, the phantom, preprocessing of raw scans.
    2: ("simpleslicenet.data",),
    # Evaluation and outputs: metrics, calibration, clusters, previews and the files written per scan.
    3: (
        "simpleslicenet.metrics",
        "simpleslicenet.calibration",
        "simpleslicenet.clusters",
        "simpleslicenet.preview",
        "simpleslicenet.scan_outputs",
        "simpleslicenet.visualization",
        "simpleslicenet.reports",
    ),
    # Each model, backbones, the model table, export.
    4: ("simpleslicenet.models",),
    # What uses models: deployment, the sweep, training tools.
    5: ("simpleslicenet.deploy", "simpleslicenet.benchmark", "simpleslicenet.training", "simpleslicenet.bids"),
    # The faces: command line, anomalib registration, the package root.
    6: ("simpleslicenet", "simpleslicenet.cli", "simpleslicenet.plugin", "simpleslicenet._anomalib_hook"),
}

# Imports of the package inside a function, each deferring a heavy dependency on purpose:
# (importing file, imported module or "*" for any) -> why.
DEFERRED = {
    ("simpleslicenet/__init__.py", "simpleslicenet.models.registry"):
        "every interpreter imports the package at start-up (the anomalib hook): names load on first use",
    ("simpleslicenet/_anomalib_hook.py", "simpleslicenet.plugin"):
        "anomalib: registration runs only once anomalib's command line is loaded",
    ("simpleslicenet/models/registry.py", "simpleslicenet.models.slicewise"):
        "anomalib: the table is read at start-up, the wrappers load when an anomalib model is asked for",
    ("simpleslicenet/cli.py", "*"): "each subcommand loads only what it needs (torch and anomalib, SimpleITK)",
    ("simpleslicenet/bids/__init__.py", "*"): "the command line builds its parser from bids.command without the models",
    ("simpleslicenet/bids/command.py", "*"): "each BIDS command loads only what it needs (the reader, deploy, Ray)",
    ("simpleslicenet/data/phantom/__init__.py", "simpleslicenet.data.phantom.montage"):
        "matplotlib; the module also runs as a script (python -m)",
    ("simpleslicenet/training/command.py", "*"): "torch: the edc command's arguments are built without it",
}

# Imports against the layers still to be taken apart: (importing file, imported module) -> why.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# Cycles still to be taken apart -> why they are there and how they go.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


class Import(NamedTuple):
    importer: str  # module name
    imported: str  # module name
    file: str  # path below src/
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known_modules() -> set[str]:
    return {_module_name(path) for path in (SRC / PACKAGE).rglob("*.py")}


def _package_imports() -> list[Import]:
    """Every import of the package in its source, outside ``if TYPE_CHECKING:`` blocks."""
    known = _known_modules()
    found = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def context(node: ast.AST) -> tuple[bool, bool]:
            in_function = type_checking = False
            while node in parents:
                node = parents[node]
                in_function |= isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                type_checking |= isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            return in_function, type_checking

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # "from package import submodule" imports the submodule.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            in_function, type_checking = context(node)
            file = str(path.relative_to(SRC))
            found += [
                Import(module, target, file, node.lineno, in_function)
                for target in dict.fromkeys(targets)
                if (target == PACKAGE or target.startswith(PACKAGE + ".")) and not type_checking
            ]
    return found


def layer_of(module: str) -> int | None:
    """The layer of a module: that of the longest prefix in :data:`LAYERS` that names it."""
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (layer, len(prefix))
    return None if best is None else best[0]


def _unit(module: str) -> str:
    """What the cycle check compares: a core module by itself (wherever it lives), else its subpackage
    (``simpleslicenet.models.registry`` -> ``simpleslicenet.models``) or top-level module."""
    return module if layer_of(module) == 1 else ".".join(module.split(".")[:2])


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Groups of packages that import each other, directly or round a loop (strongly connected, size > 1)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for item in imports:
        source, target = _unit(item.importer), _unit(item.imported)
        if source != target and target != PACKAGE:
            graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _where(item: Import) -> str:
    return f"{item.file}:{item.line} imports {item.imported}"


def test_every_module_has_a_layer() -> None:
    assert not [name for name in sorted(_known_modules()) if layer_of(name) is None]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = [
        f"{_where(item)} (layer {layer_of(item.importer)} -> {layer_of(item.imported)})"
        for item in _package_imports()
        if layer_of(item.imported) > layer_of(item.importer) and (item.file, item.imported) not in KNOWN_UPWARD
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages() -> None:
    cycles = [group for group in import_cycles(_package_imports()) if frozenset(group) not in KNOWN_CYCLES]
    assert not cycles


def test_the_cycle_check_sees_a_cycle() -> None:
    imports = [
        Import("simpleslicenet.models.a", "simpleslicenet.deploy.b", "a.py", 1, False),
        Import("simpleslicenet.deploy.b", "simpleslicenet.models.c", "b.py", 1, True),
    ]
    assert import_cycles(imports) == [["simpleslicenet.deploy", "simpleslicenet.models"]]
    # A core module inside a package is a unit of its own: models.scoring <- model_metadata <- models is no cycle.
    core = [
        Import("simpleslicenet.model_metadata", "simpleslicenet.models.scoring", "m.py", 1, False),
        Import("simpleslicenet.models.export", "simpleslicenet.model_metadata", "e.py", 1, False),
    ]
    assert import_cycles(core) == []
    assert layer_of("simpleslicenet.models.scoring") == 1 and layer_of("simpleslicenet.models.registry") == 4


def test_package_imports_inside_functions_are_deliberate_deferrals() -> None:
    unlisted = [
        _where(item)
        for item in _package_imports()
        if item.in_function and (item.file, item.imported) not in DEFERRED and (item.file, "*") not in DEFERRED
    ]
    assert not unlisted, "move these to the top of their module, or list why they wait:\n" + "\n".join(unlisted)


def test_public_modules_declare_all() -> None:
    missing = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        if any(part.startswith("_") for part in path.relative_to(SRC).with_suffix("").parts if part != "__init__"):
            continue
        tree = ast.parse(path.read_text())
        names = {target.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name)}  # fmt: skip
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if "__all__" not in names and "__getattr__" not in functions:
            missing.append(str(path.relative_to(SRC)))
    assert not missing


def test_deployment_and_the_core_load_no_training_stack() -> None:
    # Deployment on a CPU box imports neither anomalib nor Lightning (seconds of start-up per process).
    code = (
        "import sys\n"
        "import simpleslicenet.model_metadata, simpleslicenet.atomic, simpleslicenet.deploy\n"
        "print(sorted(m for m in ('anomalib', 'lightning', 'simpleslicenet.models.volume_model') if m in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert completed.stdout.strip() == "[]"
