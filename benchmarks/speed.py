"""Speed and memory of SimpleSliceNet per volume, and of its pooled features against the unfolded original.

Every measurement runs in its own subprocess so its peak memory is its own: on CPU the growth of the
process's maximum resident set size (``resource.getrusage``) over the measured call, on CUDA
``torch.cuda.max_memory_allocated`` after a reset. Timings are medians over ``--repeats`` runs after
one warm-up. Backbones use random weights: timing does not depend on them.

Measured for each backbone:

* training step, s/volume: slice features, depth cells, and one pass of flow steps over all of them
  (``features_per_step`` each, noised copies included, backward and Adam), as in training;
* inference, s/volume: features, flow and the smoothed voxel map;
* feature extraction, pooled (3×3 average pool + channel-group mean) against the original unfolded
  formulation (3×3 unfold + 1-D adaptive pooling), time and peak memory side by side;
* inference time against the number of slices, with a least-squares slope in s/slice.

Usage::

    python benchmarks/speed.py                              # 192×192×96, CPU
    python benchmarks/speed.py --device cuda --bf16 --channels-last
    python benchmarks/speed.py --size 64 64 24 --repeats 1  # quick check

Writes ``benchmarks/results/speed_<device>_<size>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONES = {
    # name: (layers, embed_dim) as in configs/model/simpleslicenet.yaml and simpleslicenet_paper.yaml
    "tf_efficientnet_lite0": (["blocks.2", "blocks.4"], None),
    "wide_resnet50_2": (["layer2", "layer3"], 512),
}


# ----------------------------------------------------------------------------------- child process
def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, or ``None``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark to its current size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    """High-water mark of the resident set: ``VmHWM`` where it can be reset, else ``ru_maxrss``."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def unfolded_embedding(maps, layer_dims: list[int], out_dim: int):
    """The original formulation: unfold 3×3 patches, upsample, adaptive 1-D pooling per layer, fuse."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    reference_size = maps[0].shape[-2:]
    per_layer = []
    for feature_map, layer_dim in zip(maps, layer_dims, strict=True):
        batch, channels, height, width = feature_map.shape
        patches = F.unfold(feature_map, kernel_size=3, padding=1).view(batch, channels * 9, height, width)
        if (height, width) != tuple(reference_size):
            patches = F.interpolate(patches, size=reference_size, mode="bilinear", align_corners=False)
        rows = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * 9)
        per_layer.append(F.adaptive_avg_pool1d(rows, layer_dim))
    fused = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), out_dim)
    return fused.view(maps[0].shape[0], *reference_size, out_dim).permute(0, 3, 1, 2)


def run_case(case: dict) -> dict:
    """Measure one case in this process; returns timings (s) and peak memory (bytes)."""
    import torch

    from simpleslicenet.models.simpleslicenet.lightning_model import fit_flow_on_features
    from simpleslicenet.models.simpleslicenet.loss import create_loss
    from simpleslicenet.models.simpleslicenet.settings import SimpleSliceNetSettings
    from simpleslicenet.models.simpleslicenet.torch_model import SimpleSliceNetModel

    device = torch.device(case["device"])
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    layers, embed_dim = BACKBONES[case["backbone"]]
    settings = SimpleSliceNetSettings(
        backbone=case["backbone"], layers=layers, backbone_weights="random", embed_dim=embed_dim, variant="paper",
        slice_padding=0,
    )
    model = SimpleSliceNetModel(settings).to(device)
    memory_format = torch.channels_last if case["channels_last"] else torch.contiguous_format
    model.encoder.backbone.to(memory_format=memory_format)
    height, width, depth = case["size"]
    depth = case.get("depth", depth)
    images = torch.randn(depth, 3, height, width, device=device).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if case["bf16"] else nullcontext()
    kind = case["kind"]

    if kind == "train":
        model.train()
        loss_function = create_loss("bgspp")
        optimizer = torch.optim.Adam([p for p in model.flow.parameters() if p.requires_grad], lr=1e-3)

        def work() -> None:
            with autocast:
                features, conditions = model.training_features(images, [slice(0, depth)])
            fit_flow_on_features(model.flow, loss_function, features.float(), conditions, optimizer)

    elif kind == "infer":
        model.eval()

        def work() -> None:
            with torch.no_grad(), autocast:
                model(images)

    elif kind in {"features_pooled", "features_unfolded"}:
        model.eval()
        encoder = model.encoder

        def work() -> None:
            with torch.no_grad(), autocast:
                maps = encoder.backbone(images)
                if kind == "features_pooled":
                    encoder.embed(maps)
                else:
                    unfolded_embedding(maps, encoder.layer_dims, encoder.out_dim)

    elif kind != "scaling":
        msg = f"unknown case kind {kind!r}"
        raise ValueError(msg)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if kind == "scaling":
        return scaling(model, case, autocast, synchronize)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        # What the work adds to the resident set over the model and inputs already in memory.
        base = _status_bytes("VmRSS") or _peak_rss_bytes()
        _reset_peak_rss()
    work()  # warm-up (and cuDNN autotuning); its allocations count towards the peak
    synchronize()
    timings = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        work()
        synchronize()
        timings.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    return {
        "seconds": statistics.median(timings),
        "seconds_all": timings,
        "peak_memory_bytes": peak - base,
        "process_peak_memory_bytes": peak,
    }


def scaling(model, case: dict, autocast, synchronize) -> dict:
    """Inference time for each slice count in ``case["depths"]``, repeats interleaved against drift."""
    import torch

    height, width, _ = case["size"]
    device = next(model.parameters()).device
    model.eval()
    volumes = {d: torch.randn(d, 3, height, width, device=device) for d in case["depths"]}
    timings: dict[int, list[float]] = {d: [] for d in case["depths"]}
    with torch.no_grad(), autocast:
        for images in volumes.values():
            model(images)  # warm-up per shape
        synchronize()
        for _ in range(case["repeats"]):
            for depth, images in volumes.items():
                start = time.perf_counter()
                model(images)
                synchronize()
                timings[depth].append(time.perf_counter() - start)
    seconds = [statistics.median(timings[d]) for d in case["depths"]]
    slope, intercept = fit_slope(case["depths"], seconds)
    return {"depths": case["depths"], "seconds": seconds, "seconds_per_slice": slope, "intercept_seconds": intercept}


# ---------------------------------------------------------------------------------- parent process
def measure(case: dict) -> dict:
    """Run one case in a fresh interpreter and read its result."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as handle:
        result_path = handle.name
    try:
        command = [sys.executable, __file__, "--case", json.dumps(case), "--case-output", result_path]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            tail = completed.stderr.strip().splitlines()[-5:]
            return {"error": " | ".join(tail) or f"exit code {completed.returncode}"}
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


def fit_slope(depths: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = intercept + slope · depth``."""
    mean_d, mean_s = statistics.fmean(depths), statistics.fmean(seconds)
    var = sum((d - mean_d) ** 2 for d in depths)
    slope = sum((d - mean_d) * (s - mean_s) for d, s in zip(depths, seconds, strict=True)) / var
    return slope, mean_s - slope * mean_d


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def markdown(report: dict) -> str:
    """The results as a markdown table (one row per backbone) plus the slice-cost fit."""
    memory = "peak GPU memory (MB)" if report["device"].startswith("cuda") else "peak RSS growth (MB)"
    lines = [
        f"SimpleSliceNet speed, volume {'×'.join(map(str, report['size']))} (H×W×D), device {report['device']}"
        f"{', bf16' if report['bf16'] else ''}{', channels-last' if report['channels_last'] else ''}",
        "",
        f"| backbone | train s/volume | infer s/volume | infer {memory} | train {memory} "
        f"| features pooled s | features unfolded s | time ratio unfolded/pooled "
        f"| pooled {memory} | unfolded {memory} | memory ratio | s/slice (slope) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["backbones"].items():

        def get(kind: str, key: str, row=row):
            return row[kind].get(key) if isinstance(row.get(kind), dict) else None

        pooled_t, unfolded_t = get("features_pooled", "seconds"), get("features_unfolded", "seconds")
        pooled_m, unfolded_m = (
            get("features_pooled", "peak_memory_bytes"),
            get("features_unfolded", "peak_memory_bytes"),
        )
        time_ratio = f"{unfolded_t / pooled_t:.2f}" if pooled_t and unfolded_t else "—"
        memory_ratio = f"{unfolded_m / pooled_m:.2f}" if pooled_m and unfolded_m else "—"
        slope = row.get("slice_cost", {}).get("seconds_per_slice")
        lines.append(
            f"| {name} | {_s(get('train', 'seconds'))} | {_s(get('infer', 'seconds'))} "
            f"| {_mb(get('infer', 'peak_memory_bytes'))} | {_mb(get('train', 'peak_memory_bytes'))} "
            f"| {_s(pooled_t)} | {_s(unfolded_t)} | {time_ratio} | {_mb(pooled_m)} | {_mb(unfolded_m)} "
            f"| {memory_ratio} | {_s(slope)} |"
        )
        errors = {kind: value["error"] for kind, value in row.items() if isinstance(value, dict) and "error" in value}
        lines.extend(f"\n{name} {kind} failed: {error}" for kind, error in errors.items())
    lines.append(
        "\nMemory: "
        + (
            "peak allocated minus allocated before the measured work."
            if report["device"].startswith("cuda")
            else "growth of the resident set's high-water mark over the model and inputs "
            "(Linux VmHWM, reset before the work)."
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every case and write the report; returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[192, 192, 96], metavar=("H", "W", "D"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels-last backbone and inputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--depths", type=int, nargs="+", default=None, help="slice counts for the s/slice fit (default: D/4, D/2, D)"
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--case-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        result = run_case(json.loads(args.case))
        Path(args.case_output).write_text(json.dumps(result))
        return result

    height, width, depth = args.size
    depths = args.depths or sorted({max(3, depth // 4), max(3, depth // 2), depth})
    common = {
        "device": args.device,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "size": args.size,
        "repeats": args.repeats,
    }
    report = {
        "size": args.size,
        "device": args.device,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backbones": {},
    }
    for backbone in args.backbones:
        row: dict = {}
        for kind in ("train", "infer", "features_pooled", "features_unfolded"):
            row[kind] = measure({**common, "backbone": backbone, "kind": kind})
            print(f"{backbone} {kind}: {row[kind]}", file=sys.stderr, flush=True)
        row["slice_cost"] = measure({**common, "backbone": backbone, "kind": "scaling", "depths": depths})
        print(f"{backbone} slice cost: {row['slice_cost']}", file=sys.stderr, flush=True)
        report["backbones"][backbone] = row

    suffix = f"{args.device.replace(':', '')}{'_bf16' if args.bf16 else ''}{'_cl' if args.channels_last else ''}"
    output = args.output or RESULTS / f"speed_{suffix}_{height}x{width}x{depth}.json"
    from simpleslicenet.atomic import atomic_write_text

    atomic_write_text(output, json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwritten: {output}")
    return report


if __name__ == "__main__":
    main()
