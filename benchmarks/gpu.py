"""GPU speed, memory and map parity of SimpleSliceNet and its baselines at 192×192×96, in one run.

Models: SimpleSliceNet with EfficientNet-Lite0 (the offline ImageNet weights) and with WideResNet50-2
(random weights: ImageNet weights for it cannot be downloaded here; timing does not depend on them),
AE3D, and PatchcoreSlices (EfficientNet-Lite0). Each model is built once, trained a few steps on the
input volume so that its flow or memory bank is not at its start, and every variant gets those
weights:

* ``fp32``: eager, TF32 off for matmuls and convolutions (the reference map of every parity figure);
* ``fp32+tf32``: eager with TF32 matmuls and convolutions (CUDA only);
* ``bf16``: the slice encoder (AE3D: the network, PatchCore: the feature extractor) under bf16
  autocast, channels-last; the flow, the map and the scores stay float32;
* ``bf16+graph``: ``bf16`` with the whole device call replayed as one CUDA graph (CUDA only);
* ``bf16+compile``: ``bf16`` with ``torch.compile`` (``--compile-mode``) of the encoder and the flow;
* ``fp32+compile``: compilation alone, for its own parity;
* ``bf16-flow`` (SimpleSliceNet, a diagnostic): autocast reaching the flow too, which the package
  prevents; it shows what that would do to the map.

Measured per variant:

* inference, ms/volume **end to end**: the NIfTI-loaded slice stack ``[D, H, W]`` in pinned host
  memory to the device, ImageNet normalisation to three channels, model, brain restriction and scores
  (:func:`~simpleslicenet.models.scoring.score_volumes`), map and volume score back into pinned host
  memory, synchronised; median of ``--repeats`` after warm-up; **device** ms: the same call with
  input and output on the device (CUDA events);
* training, ms per volume step: SimpleSliceNet: one pass of flow steps over all of the volume's
  features (4,096 a step with their noised copies, backward, Adam), the features read from the
  training feature cache as in every epoch after the first (the first adds the slice features,
  about the inference's feature time); AE3D:
  reconstruction, masked L1, backward, Adam; PatchCore: the embedding of the volume's training
  slices (every third) into the memory bank;
* peak GPU memory (``torch.cuda.max_memory_allocated``, weights and inputs included) during
  inference and during training;
* map parity: max |map − map_fp32| / max |map_fp32| over the brain-restricted map, and the relative
  change of the volume score; GFLOP per volume (``torch.utils.flop_counter``) and the rate achieved.

Figures are also given as ratios against AE3D measured in the same run and against the authors' code
(0.451 s inference, 0.668 s a training step, 6.27 GB, measured earlier on an H100). A time budget
(``--budget-s``) keeps one run under 8 minutes: compiled variants, which spend one to three minutes
compiling their inference and training graphs the first time, run last (WideResNet50 first) and are
skipped with a note once the budget is nearly spent; inductor keeps compiled graphs on disk
(``TORCHINDUCTOR_CACHE_DIR``), so a second run on the same machine compiles in seconds.

Usage::

    python benchmarks/gpu.py                                   # CUDA, 192×192×96, every model and variant
    python benchmarks/gpu.py --compile-mode max-autotune-no-cudagraphs --budget-s 900
    python benchmarks/gpu.py --device cpu --size 64 64 24 --repeats 2 --train-repeats 1   # check on a CPU

Writes ``benchmarks/results/gpu_<device>_<H>x<W>x<D>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simpleslicenet.atomic import atomic_write_text
from simpleslicenet.data.dataset import volume_to_batch
from simpleslicenet.data.phantom import generate_subject
from simpleslicenet.data.phantom.dataset import write_subject
from simpleslicenet.data.volume import VolumePreprocessing, load_volume
from simpleslicenet.models.ae3d.torch_model import AutoEncoder3dModel, masked_reconstruction_loss, residual_map
from simpleslicenet.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from simpleslicenet.models.cuda_graphs import CapturedCall
from simpleslicenet.models.registry import config_init_args, create_model, packaged_config
from simpleslicenet.models.scoring import VolumeScoring, score_volumes
from simpleslicenet.models.simpleslicenet.flow import log_likelihood
from simpleslicenet.models.simpleslicenet.feature_cache import FeatureCache
from simpleslicenet.models.simpleslicenet.lightning_model import fit_flow_on_features
from simpleslicenet.models.simpleslicenet.loss import create_loss
from simpleslicenet.models.simpleslicenet.settings import SimpleSliceNetSettings
from simpleslicenet.models.simpleslicenet.torch_model import SimpleSliceNetModel

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
# The authors' code on one H100 at 192×192×96 with WideResNet50, fp32 (the project's reference figures).
AUTHORS = {"infer_ms": 451.0, "train_ms": 668.0, "peak_gb": 6.27}
TARGETS = {"infer_ms": 7.0, "train_ms": 25.0, "peak_gb": 1.5}
MODELS = ("SimpleSliceNet-Lite0", "SimpleSliceNet-WRN50", "AE3D", "PatchcoreSlices")
SIMPLESLICENET_CONFIGS = {
    "SimpleSliceNet-Lite0": ("simpleslicenet.yaml", {}),
    "SimpleSliceNet-WRN50": ("simpleslicenet_paper.yaml", {"backbone": "wide_resnet50_2", "backbone_weights": "random"}),
}
# A 1% coreset of 16 training volumes' every third slice at 24×24 locations (the sweep's settings).
PATCHCORE_BANK_ROWS = 16 * 32 * 24 * 24 // 100
EAGER_VARIANTS = ("fp32", "fp32+tf32", "bf16", "bf16-flow", "bf16+graph")
COMPILED_VARIANTS = ("bf16+compile", "fp32+compile")


# ----------------------------------------------------------------------------------- the input
def load_input(size_hwd: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A 1 mm lesion phantom written as NIfTI and read back as training reads it: ``[D, H, W]`` slices and brain mask."""
    height, width, depth = size_hwd
    subject = generate_subject(0, lesion=True, spacing_mm=1.0)
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as folder:
        files = write_subject(subject, folder)
        volume = load_volume(
            files["image"], VolumePreprocessing(target_shape=(width, height, depth)), brain_mask_path=files["brainmask"]
        )
    batch = volume_to_batch(volume.image, brain_mask=volume.brain_mask)
    grey = batch.image[:, 0].contiguous()
    info = {"scan_shape": list(subject.image.shape), "brain_voxels": int(batch.brain_mask.sum())}
    return grey, batch.brain_mask.contiguous(), info


# ---------------------------------------------------------------------------------- the models
@dataclass
class Bench:
    """One model variant.

    Args:
        infer: The device call: grey slices ``[D, H, W]`` and brain mask in, scored map and volume score out.
        train: One training step on ``train_inputs``.
        module: The variant's model.
        train_inputs: What ``train`` reads (set by :func:`prepare_training_inputs`).
    """

    infer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    train: Callable[[], None]
    module: torch.nn.Module
    train_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


_IMAGENET: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalise(grey: torch.Tensor) -> torch.Tensor:
    """``[D, H, W]`` grey slices in [0, 1] → ImageNet-normalised ``[D, 3, H, W]`` (the pre-processor's arithmetic)."""
    if grey.device not in _IMAGENET:
        # Made once per device: a host-to-device copy is not allowed inside a CUDA-graph capture.
        _IMAGENET[grey.device] = (
            torch.tensor(IMAGENET_MEAN, device=grey.device)[None, :, None, None],
            torch.tensor(IMAGENET_STD, device=grey.device)[None, :, None, None],
        )
    mean, std = _IMAGENET[grey.device]
    return (grey[:, None] - mean) / std


def _autocast(device: torch.device, enabled: bool = True):  # noqa: ANN202
    """bf16 autocast without the cast-weight cache (which CUDA-graph capture does not allow)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False) if enabled else nullcontext()


def _scored(raw_map: torch.Tensor, brain: torch.Tensor, scoring: VolumeScoring) -> tuple[torch.Tensor, torch.Tensor]:
    scores = score_volumes(raw_map, brain, None, scoring)
    return scores.anomaly_map, scores.volume_scores[:1]


def _simpleslicenet_settings(key: str) -> SimpleSliceNetSettings:
    """The settings of the model's packaged configuration, with the benchmark's overrides."""
    config, overrides = SIMPLESLICENET_CONFIGS[key]
    return SimpleSliceNetSettings(**{**config_init_args(packaged_config(config)), **overrides})


def build_reference(key: str, grey: torch.Tensor, brain: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The model in float32, trained a few steps on the volume; every variant starts from these weights."""
    torch.manual_seed(0)
    if key.startswith("SimpleSliceNet"):
        settings = _simpleslicenet_settings(key)
        model = SimpleSliceNetModel(settings).to(device).train()
        optimizer = torch.optim.Adam([p for p in model.flow.parameters() if p.requires_grad], lr=settings.lr)
        features, conditions = model.training_features(_normalise(grey), [slice(0, grey.shape[0])])
        loss = create_loss(settings.loss)
        for _ in range(3):
            fit_flow_on_features(model.flow, loss, features, conditions, optimizer, settings.features_per_step)
        return {"model": model.eval(), "settings": settings, "scoring": settings.scoring()}
    if key == "AE3D":
        module = create_model("AE3D", visualizer=False)
        model = module.model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=module.hparams.get("lr", 1e-3))
        volume, mask = AutoEncoder3dModel.fold(grey[:, None]), brain[None, None]
        for _ in range(3):
            optimizer.zero_grad()
            masked_reconstruction_loss(volume, model.reconstruct(volume), mask).backward()
            optimizer.step()
        return {"model": model.eval(), "scoring": module.scoring}
    module = create_model("PatchcoreSlices", visualizer=False)
    model = module.model.to(device).train()
    with torch.no_grad():
        # The bank comes from the mirrored volume: distances to the test volume are then not zero.
        model(_normalise(grey.flip(-1))[:: module.train_slice_stride])
    bank = torch.cat(model.embedding_store)
    model.embedding_store.clear()
    rows = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(0))[:PATCHCORE_BANK_ROWS]
    model.memory_bank = bank[rows.to(bank.device)].clone()
    return {"model": model.eval(), "scoring": module.scoring, "stride": module.train_slice_stride}


def build_variant(key: str, variant: str, reference: dict, device: torch.device, compile_mode: str) -> Bench:
    """One variant of a model, with the reference weights."""
    bf16 = variant.startswith("bf16")
    compiled = variant.endswith("+compile")
    scoring = reference["scoring"]
    inputs: dict[str, torch.Tensor] = {}
    if key.startswith("SimpleSliceNet"):
        settings = dataclasses.replace(reference["settings"], compile_mode=compile_mode if compiled else None)
        model = SimpleSliceNetModel(settings, precision="bf16" if bf16 and variant != "bf16-flow" else "fp32").to(device)
        model.load_state_dict(reference["model"].state_dict())
        model.eval()
        # bf16 variants also run the backbone in channels-last layout (what GPU tensor cores prefer).
        layout = torch.channels_last if bf16 else torch.contiguous_format
        model.encoder.backbone.to(memory_format=layout)

        if variant == "bf16-flow":

            def infer(grey: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                images = _normalise(grey)
                with _autocast(device):
                    features = model.encoder(images.contiguous(memory_format=torch.channels_last))
                    cells, conditions = model.volume_cells(features)
                    # The couplings called directly, without the float32 pin of ConditionalFlow.forward.
                    z, log_det = model.flow.couplings(model.to_rows(cells), conditions)
                grid = log_likelihood(z.float(), log_det.float()).view(cells.shape[0], *cells.shape[-2:])
                return _scored(model.anomaly_map_generator.volume_map(grid, tuple(grey.shape)), brain, scoring)

        else:

            def infer(grey: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return _scored(model.predict_volume(_normalise(grey).contiguous(memory_format=layout)), brain, scoring)

        loss = create_loss(settings.loss)
        optimizer = torch.optim.Adam([p for p in model.flow.parameters() if p.requires_grad], lr=settings.lr)

        # As in training: the frozen encoder's cells of the volume are computed once (the warm-up) and
        # read back from host memory in every later step, which trains the flow only.
        cache = FeatureCache(max_bytes=1 << 34)

        def train() -> None:
            model.train()
            images = inputs["images"]
            cells = cache.get("volume", images.device)
            if cells is None:
                [cells] = model.training_cells(images, [slice(0, images.shape[0])])
                cache.put("volume", cells)
            features, conditions = model.flow_batch([cells])
            fit_flow_on_features(model.flow, loss, features, conditions, optimizer, settings.features_per_step)
            model.eval()

        return Bench(infer=infer, train=train, module=model, train_inputs=inputs)

    model = copy.deepcopy(reference["model"])
    if key == "AE3D":
        if bf16:
            model = model.to(memory_format=torch.channels_last_3d)
        if compiled:
            # Callers use reconstruct(), not the module call that Module.compile would compile.
            model.reconstruct = torch.compile(model.reconstruct, mode=compile_mode)
        sigma = model.sigma
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def infer(grey: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            volume = AutoEncoder3dModel.fold(grey[:, None])
            with _autocast(device, bf16):
                reconstruction = model.reconstruct(volume.contiguous(memory_format=torch.channels_last_3d) if bf16 else volume)
            return _scored(residual_map(volume, reconstruction.float(), sigma)[0, 0], brain, scoring)

        def train() -> None:
            model.train()
            volume, mask = inputs["volume"], inputs["mask"]
            optimizer.zero_grad()
            with _autocast(device, bf16):
                reconstruction = model.reconstruct(volume)
            masked_reconstruction_loss(volume, reconstruction.float(), mask).backward()
            optimizer.step()
            model.eval()

        return Bench(infer=infer, train=train, module=model, train_inputs=inputs)

    # PatchCore: the feature extractor is where bf16, channels-last and compilation apply.
    extractor = model.feature_extractor
    if bf16:
        extractor.to(memory_format=torch.channels_last)
        forward = extractor.forward

        def bf16_forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
            with _autocast(device):
                features = forward(images.contiguous(memory_format=torch.channels_last))
            return {name: value.float() for name, value in features.items()}

        extractor.forward = bf16_forward
    if compiled:
        extractor.compile(mode=compile_mode)
    stride = reference["stride"]

    def infer(grey: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _scored(model(_normalise(grey)).anomaly_map, brain, scoring)

    def train() -> None:
        model.train()
        with torch.no_grad():
            model(inputs["images"][::stride])
        model.embedding_store.clear()
        model.eval()

    return Bench(infer=infer, train=train, module=model, train_inputs=inputs)


# -------------------------------------------------------------------------------- measurement
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def tf32(enabled: bool) -> Any:  # noqa: ANN401
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_variant(
    key: str,
    variant: str,
    reference: dict,
    host: tuple[torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor] | None,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Inference (end to end and on the device), training, peak memory and parity of one variant."""
    row: dict[str, Any] = {"model": key, "variant": variant}
    host_grey, host_brain = host
    grey, brain = host_grey.to(device), host_brain.to(device)
    with tf32(variant == "fp32+tf32"):
        started = time.perf_counter()
        bench = build_variant(key, variant, reference, device, args.compile_mode)
        with torch.no_grad():
            if variant == "bf16+graph":
                captured = CapturedCall(bench.infer, grey, brain)
                device_call = captured
            else:
                device_call = bench.infer
            result = device_call(grey, brain)  # first call: compilation, cuDNN autotuning
            _synchronize(device)
            row["first_call_s"] = time.perf_counter() - started
            for _ in range(2):
                device_call(grey, brain)
            out_map = torch.empty(tuple(grey.shape), pin_memory=device.type == "cuda")
            out_score = torch.empty(1, pin_memory=device.type == "cuda")

            def end_to_end() -> None:
                anomaly_map, score = device_call(
                    host_grey.to(device, non_blocking=True), host_brain.to(device, non_blocking=True)
                )
                out_map.copy_(anomaly_map, non_blocking=True)
                out_score.copy_(score, non_blocking=True)
                _synchronize(device)

            _synchronize(device)
            _reset_peak(device)
            end_to_end()
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                end_to_end()
                seconds.append(time.perf_counter() - start)
            row["infer_ms"] = 1e3 * statistics.median(seconds)
            row["infer_peak_gb"] = _peak_gb(device)
            if device.type == "cuda":
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.repeats)]
                for begin, end in events:
                    begin.record()
                    device_call(grey, brain)
                    end.record()
                _synchronize(device)
                row["device_ms"] = statistics.median(begin.elapsed_time(end) for begin, end in events)
            result = tuple(value.clone() for value in device_call(grey, brain))
        if expected is not None:
            reference_map, reference_score = expected
            scale = float(reference_map.abs().max())
            row["map_parity"] = float((result[0] - reference_map).abs().max()) / scale if scale else None
            row["score_parity"] = float((result[1] - reference_score).abs().max() / reference_score.abs().clamp_min(1e-12))
        if variant in args.train_variants:
            prepare_training_inputs(key, bench, grey, brain)
            bench.train()  # warm-up (and compilation of the backward graph)
            _synchronize(device)
            _reset_peak(device)
            seconds = []
            for _ in range(args.train_repeats):
                start = time.perf_counter()
                bench.train()
                _synchronize(device)
                seconds.append(time.perf_counter() - start)
            row["train_ms"] = 1e3 * statistics.median(seconds)
            row["train_peak_gb"] = _peak_gb(device)
    row["total_s"] = time.perf_counter() - started
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, result


def prepare_training_inputs(key: str, bench: Bench, grey: torch.Tensor, brain: torch.Tensor) -> None:
    """What a variant's training step reads: the normalised slices (AE3D: the volume and its brain mask)."""
    if key == "AE3D":
        bench.train_inputs.update(volume=AutoEncoder3dModel.fold(grey[:, None]), mask=brain[None, None])
    else:
        bench.train_inputs.update(images=_normalise(grey))


def count_gflop(reference: dict, grey: torch.Tensor, brain: torch.Tensor) -> float | None:
    """GFLOP of one float32 inference (convolutions and matrix products, as torch's flop counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = reference["model"]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(model, SimpleSliceNetModel):
                model.predict_volume(_normalise(grey))
            elif isinstance(model, AutoEncoder3dModel):
                model.reconstruct(AutoEncoder3dModel.fold(grey[:, None]))
            else:
                model(_normalise(grey))
    except Exception:  # noqa: BLE001 - the count is informative only
        return None
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if not numerator or not denominator else f"{numerator / denominator:.1f}×"


def _parity(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def markdown(report: dict) -> str:
    """The rows as a markdown table, then the targets."""
    rows = [row for row in report["rows"] if "error" not in row and "skipped" not in row]
    ae3d = {row["variant"]: row for row in rows if row["model"] == "AE3D"}
    lines = [
        f"GPU benchmark, {'×'.join(map(str, report['size_hwd']))} (H×W×D), {report['device_name']}, torch {report['torch']}",
        "",
        (
            "| model | variant | infer ms/vol (end to end) | device ms | AE3D fp32 / this | authors' 451 ms / this "
            "| train ms/vol step | AE3D train / this | infer peak GB | train peak GB | map parity | score parity | first call s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference_ae3d = ae3d.get("fp32", {})
    # The authors' figures are from an H100: a ratio against them means something on a GPU only.
    authors = AUTHORS["infer_ms"] if report["device"].startswith("cuda") else None
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {_fmt(row.get('infer_ms'), 2)} | {_fmt(row.get('device_ms'), 2)} "
            f"| {_ratio(reference_ae3d.get('infer_ms'), row.get('infer_ms'))} | {_ratio(authors, row.get('infer_ms'))} "
            f"| {_fmt(row.get('train_ms'), 2)} | {_ratio(reference_ae3d.get('train_ms'), row.get('train_ms'))} "
            f"| {_fmt(row.get('infer_peak_gb'), 2)} | {_fmt(row.get('train_peak_gb'), 2)} "
            f"| {_parity(row.get('map_parity'))} | {_parity(row.get('score_parity'))} | {_fmt(row.get('first_call_s'))} |"
        )
    for row in report["rows"]:
        if "error" in row or "skipped" in row:
            lines.append(f"\n{row['model']} {row['variant']}: {row.get('error') or row.get('skipped')}")
    lines.append(
        "\nWideResNet50-2 has random weights (its ImageNet weights cannot be downloaded here): times and memory "
        "are those of the real network, parity figures come from random features. Parity: max |map − fp32 map| / "
        "max |fp32 map| over the brain-restricted map. Peak memory includes weights and inputs."
    )
    gflop = {key: value for key, value in report["gflop"].items() if value}
    if gflop:
        lines.append("GFLOP per volume (fp32 inference): " + ", ".join(f"{k} {v:,.1f}" for k, v in gflop.items()))
    on_gpu = report["device"].startswith("cuda")
    lines.append(
        "\nTargets (SimpleSliceNet-WRN50, best variant)"
        + (":" if on_gpu else ", for an H100/H200 at 192×192×96; this run is not on a GPU, so they do not apply:")
    )
    for line in target_lines(report):
        lines.append(f"- {line}")
    return "\n".join(lines)


def target_lines(report: dict) -> list[str]:
    """Each target of the issue against the best measured variant."""
    rows = [row for row in report["rows"] if "error" not in row and "skipped" not in row]

    def best(model: str, field: str) -> dict | None:
        candidates = [row for row in rows if row["model"] == model and row.get(field) is not None and row["variant"] != "bf16-flow"]
        return min(candidates, key=lambda row: row[field]) if candidates else None

    lines = []
    wrn_infer, wrn_train = best("SimpleSliceNet-WRN50", "infer_ms"), best("SimpleSliceNet-WRN50", "train_ms")
    lite_infer, ae_infer = best("SimpleSliceNet-Lite0", "infer_ms"), best("AE3D", "infer_ms")
    if wrn_infer:
        against_ae3d = f"; AE3D best {ae_infer['infer_ms']:.2f} ms" if ae_infer else ""
        against_authors = (
            f"; {AUTHORS['infer_ms'] / wrn_infer['infer_ms']:.0f}× the authors' code (target ≥ 60×)"
            if report["device"].startswith("cuda")
            else ""
        )
        lines.append(
            f"inference {wrn_infer['infer_ms']:.2f} ms ({wrn_infer['variant']}; target ≤ {TARGETS['infer_ms']} ms and "
            f"faster than AE3D{against_ae3d}){against_authors}"
        )
        if wrn_infer.get("infer_peak_gb") is not None:
            lines.append(f"inference peak memory {wrn_infer['infer_peak_gb']:.2f} GB (target ≤ {TARGETS['peak_gb']} GB)")
    if wrn_train:
        peak = wrn_train.get("train_peak_gb")
        lines.append(
            f"training step {wrn_train['train_ms']:.2f} ms ({wrn_train['variant']}; target ≤ {TARGETS['train_ms']} ms"
            + (f", peak {peak:.2f} GB)" if peak is not None else ")")
        )
    if lite_infer and wrn_infer:
        lines.append(f"EfficientNet-Lite0 inference {lite_infer['infer_ms']:.2f} ms ({lite_infer['variant']}; target: faster than WRN50)")
    return lines


# ---------------------------------------------------------------------------------------- main
def applies(key: str, variant: str, device: torch.device) -> bool:
    """Whether a variant is measured for a model on a device."""
    if variant in {"fp32+tf32", "bf16+graph"} and device.type != "cuda":
        return False  # TF32 and CUDA graphs exist only on CUDA
    if variant == "bf16-flow":
        return key.startswith("SimpleSliceNet")  # a diagnostic of the flow
    return not (key == "PatchcoreSlices" and variant == "fp32+compile")


def main(argv: list[str] | None = None) -> dict:
    """Run every model and variant within the time budget, write the JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, nargs=3, default=[192, 192, 96], metavar=("H", "W", "D"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=20, help="timed inference calls per variant")
    parser.add_argument("--train-repeats", type=int, default=10, help="timed training steps per variant")
    parser.add_argument(
        "--train-variants", nargs="+", default=["fp32", "bf16", "bf16+compile"], help="variants whose training is timed"
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled variants")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the whole run")
    parser.add_argument(
        "--compile-reserve-s",
        type=float,
        default=150.0,
        help="start a compiled variant only with this much budget left (its inference and training compile)",
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of an earlier run's JSON and stop")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        print(markdown(report))
        return report
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 reference

    grey, brain, input_info = load_input(tuple(args.size))
    pinned = device.type == "cuda"
    host = (grey.pin_memory() if pinned else grey, brain.pin_memory() if pinned else brain)
    report: dict[str, Any] = {
        "size_hwd": args.size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "compile_mode": args.compile_mode,
        "input": input_info,
        "authors_reference_h100": AUTHORS,
        "targets": TARGETS,
        "gflop": {},
        "rows": [],
    }
    plan = [(key, variant) for key in args.models for variant in EAGER_VARIANTS]
    if not args.no_compile:
        # The paper's backbone first: if the budget runs out, the figures that matter most are in.
        order = sorted(args.models, key=lambda key: key != "SimpleSliceNet-WRN50")
        plan += [(key, variant) for variant in COMPILED_VARIANTS for key in order]
    plan = [(key, variant) for key, variant in plan if applies(key, variant, device)]
    references: dict[str, dict] = {}
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, variant in plan:
        left = args.budget_s - (time.perf_counter() - started)
        if variant.endswith("+compile") and left < args.compile_reserve_s:
            report["rows"].append({"model": key, "variant": variant, "skipped": f"time budget ({left:.0f} s left)"})
            continue
        try:
            if key not in references:
                references[key] = build_reference(key, grey.to(device), brain.to(device), device)
                report["gflop"][key] = count_gflop(references[key], grey.to(device), brain.to(device))
            row, result = measure_variant(key, variant, references[key], host, expected.get(key), args, device)
            if variant == "fp32":
                expected[key] = result
        except Exception as error:  # noqa: BLE001 - one failed variant must not lose the others
            row = {"model": key, "variant": variant, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        report["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    size = "x".join(map(str, args.size))
    output = args.output or RESULTS / f"gpu_{device.type}_{size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(report, indent=2, default=str))
    print(markdown(report))
    print(f"\nwritten: {output} ({report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
