"""Sweep configuration: a YAML grid of models × datasets × seeds, expanded into single runs.

Example (``configs/benchmark/phantom_quick.yaml``)::

    name: phantom_quick
    output: benchmarks/results/phantom_quick
    seeds: [0, 1]
    trainer: {accelerator: cpu, max_epochs: 2}
    datasets:
      phantom:
        class_path: BrainPhantom
        init_args: {n_healthy: 24, n_lesion: 16, spacing_mm: 2.0, target_shape: [96, 104, 48]}
    models:
      SimpleSliceNet:
        init_args: {depth_stride: 3}
        trainer: {max_epochs: 4}       # per-model trainer overrides
      AE3D: {}
      SimpleSliceNet-k1:                 # a second entry of one model: `name` is the registry name
        name: SimpleSliceNet
        init_args: {depth_stride: 1}
      SimpleSliceNet-phantom:
        name: SimpleSliceNet
        config: simpleslicenet_phantom.yaml  # init_args of a packaged model config (init_args override)
        select_checkpoint: {every_n_epochs: 2}  # the authors' protocol: test the checkpoint with the
                                                # best validation slice AUROC (optimistic, labelled so)

Model names are the registry's (``simpleslicenet.models.registry``); dataset class paths are the
datamodule names of :mod:`simpleslicenet.data.datamodules`, anomalib's, or full dotted paths.
An optional ``executor`` section runs the runs as Ray tasks instead of one after another here
(:class:`~simpleslicenet.benchmark.executors.ExecutorSettings`); it is not part of any run's id.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from simpleslicenet.benchmark.executors import ExecutorSettings
from simpleslicenet.models.registry import config_init_args, get_spec, model_defaults, packaged_config

__all__ = ["RunSpec", "SweepConfig", "load_sweep"]


@dataclass
class RunSpec:
    """Everything one run needs; its ``run_id`` names its result file (the resume key).

    ``label`` is the name the sweep file gives the entry (tables use it); ``model`` is the registry
    name, so one registry model can appear twice with different settings.
    """

    label: str
    model: str
    model_args: dict
    dataset: str
    dataset_class: str
    dataset_args: dict
    seed: int
    trainer: dict
    export: bool = False
    select_checkpoint: dict | None = None
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.run_id:
            # The id changes whenever anything that affects the result changes, so a resumed
            # sweep never reuses a result computed with other settings.
            payload = json.dumps(
                {k: v for k, v in asdict(self).items() if k != "run_id"}, sort_keys=True, default=str
            )
            digest = hashlib.sha1(payload.encode()).hexdigest()[:8]
            self.run_id = f"{self.dataset}__{self.label}__seed{self.seed}__{digest}"


@dataclass
class SweepConfig:
    """A parsed sweep file."""

    name: str
    output: Path
    runs: list[RunSpec] = field(default_factory=list)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


def _merge(base: dict, override: dict | None) -> dict:
    merged = copy.deepcopy(base)
    merged.update(override or {})
    return merged


def _model_args(entry: dict, name: str, sweep_path: Path) -> dict:
    """Every argument the entry's model gets: its ``init_args`` over those of its ``config``.

    Without a ``config`` the registered model's own configuration gives the defaults. With one, that
    configuration is the model's whole configuration (the class's defaults fill the rest), as with
    ``anomalib train --config``: its settings never mix with the registered configuration's.
    """
    if not entry.get("config"):
        base = model_defaults(name) if get_spec(name) is not None else {}
    else:
        try:
            base = config_init_args(packaged_config(entry["config"]))
        except FileNotFoundError as error:
            msg = f"{sweep_path}: {error}"
            raise ValueError(msg) from error
    # Plain lists, as YAML gives them, so the run id does not depend on where an argument came from.
    base = {key: list(value) if isinstance(value, tuple) else value for key, value in base.items()}
    return {**base, **entry.get("init_args", {})}


def load_sweep(path: str | Path, output: str | Path | None = None) -> SweepConfig:
    """Read a sweep YAML and expand its grid.

    Raises:
        ValueError: The file lacks ``models`` or ``datasets``, or an entry is malformed (message names the file).
    """
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        msg = f"{path}: cannot read sweep configuration ({error})"
        raise ValueError(msg) from error
    if not isinstance(config, dict) or not config.get("models") or not config.get("datasets"):
        msg = f"{path}: a sweep needs non-empty 'models' and 'datasets' sections"
        raise ValueError(msg)
    seeds = config.get("seeds", [0])
    trainer = config.get("trainer", {})
    runs = []
    for dataset_name, dataset in config["datasets"].items():
        if not isinstance(dataset, dict) or "class_path" not in dataset:
            msg = f"{path}: dataset {dataset_name!r} needs a class_path"
            raise ValueError(msg)
        for model_name, model in config["models"].items():
            model = model or {}
            model_args = _model_args(model, model.get("name", model_name), path)
            for seed in seeds:
                runs.append(
                    RunSpec(
                        label=model_name,
                        model=model.get("name", model_name),
                        model_args=model_args,
                        dataset=dataset_name,
                        dataset_class=dataset["class_path"],
                        dataset_args=_merge(dataset.get("init_args", {}), model.get("data_args")),
                        seed=int(seed),
                        trainer=_merge(trainer, model.get("trainer")),
                        export=bool(model.get("export", config.get("export", False))),
                        select_checkpoint=model.get("select_checkpoint"),
                    ),
                )
    name = config.get("name", path.stem)
    out = Path(output or config.get("output") or Path("results") / "benchmark" / name)
    executor = ExecutorSettings.parse(config.get("executor"), path)
    return SweepConfig(name=name, output=out, runs=runs, executor=executor)
