"""CPU inference of SimpleSliceNet per volume: torch eager against the exported OpenVINO model.

One process, one phantom volume, three backends timed side by side on the same slice stack
``[D, 3, H, W]`` in [0, 1]:

* ``torch``: the Lightning module's ``forward`` (ImageNet normalisation, model, post-processing —
  the graph that is exported) in ``eval()`` under ``torch.no_grad()``;
* ``openvino_f32`` and ``openvino_bf16``: the same model exported with ``model.to_openvino`` and run
  through :class:`simpleslicenet.deploy.VolumeInferencer` (``precision="f32"`` / ``"bf16"``).

The model is freshly built with the default backbone (``tf_efficientnet_lite0``, offline ImageNet
weights) and an untrained flow: timing does not depend on training. Each backend is warmed up once,
then the repeats are interleaved (torch, f32, bf16, torch, ...) so that load from other processes
affects all of them alike; median and min seconds per volume are reported. Parity is the largest
absolute difference of each OpenVINO map from the torch map, and that difference relative to the
torch map's largest absolute value. Also reported: the export time, the process's peak resident set,
``torch.get_num_threads()``, the threads OpenVINO compiled for, and whether the CPU supports bf16
(OpenVINO's optimisation capabilities).

On a CPU shared with other busy processes, torch's OpenMP threads wait at every parallel region for a
thread that has been descheduled: with as many threads as cores, even tiny element-wise ops can take a
scheduler time slice (milliseconds) each. ``--torch-threads 1`` shows how much of the torch time that is.

Usage::

    python benchmarks/cpu_inference.py                              # 192×192×96, 5 repeats
    python benchmarks/cpu_inference.py --size 64 64 24 --repeats 2  # quick check
    python benchmarks/cpu_inference.py --torch-threads 1            # torch on one thread

Prints a markdown table and writes ``benchmarks/results/cpu_inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from simpleslicenet import __version__
from simpleslicenet.atomic import atomic_write_text
from simpleslicenet.data.dataset import volume_to_batch
from simpleslicenet.data.geometry import brain_bounding_box, centred_start, crop_or_pad
from simpleslicenet.data.phantom import generate_subject
from simpleslicenet.data.volume import VolumePreprocessing, scale_intensity
from simpleslicenet.deploy import VolumeInferencer
from simpleslicenet.models.backbones import DEFAULT_BACKBONE
from simpleslicenet.models.simpleslicenet import SimpleSliceNet

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_inference.json"


def peak_rss_mib() -> float:
    """Peak resident set of this process so far, MiB (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def phantom_stack(size: tuple[int, int, int]) -> np.ndarray:
    """Slice stack ``[Z, 3, Y, X]`` in [0, 1] of a 1 mm lesion phantom cropped to the ``(x, y, z)`` grid."""
    subject = generate_subject(0, lesion=True, spacing_mm=1.0)
    brain = subject.brain_mask.astype(bool)
    image = scale_intensity(subject.image, brain, mode="percentile")
    start = centred_start(brain_bounding_box(brain), size)
    batch = volume_to_batch(crop_or_pad(image, start, size), brain_mask=crop_or_pad(brain, start, size))
    return batch.image.numpy()


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 support."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Largest absolute difference, and the same relative to the reference's largest absolute value."""
    max_abs = float(np.abs(other.astype(np.float64) - reference).max())
    scale = float(np.abs(reference).max())
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else float("nan")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[192, 192, 96], metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend after one warm-up")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = tuple(args.size)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    stack = phantom_stack(size)
    model = SimpleSliceNet()
    model.preprocessing = VolumePreprocessing(target_shape=size, spacing_mm=1.0)
    model.eval()

    with tempfile.TemporaryDirectory(prefix="cpu-inference-") as export_root:
        start = time.perf_counter()
        xml = model.to_openvino(export_root)
        export_seconds = time.perf_counter() - start
        inferencers = {p: VolumeInferencer(xml, precision=p) for p in ("f32", "bf16")}
        # Reported only: the inferencer does not expose its compiled model's settings.
        compiled = getattr(inferencers["f32"], "_compiled", None)
        openvino_threads = int(compiled.get_property("INFERENCE_NUM_THREADS")) if compiled is not None else None

        tensor = torch.from_numpy(stack)

        def run_torch() -> np.ndarray:
            with torch.no_grad():
                return model(tensor).anomaly_map.float().numpy().reshape(stack.shape[0], *stack.shape[2:])

        backends = {
            "torch": run_torch,
            "openvino_f32": lambda: inferencers["f32"].run_slices(stack).numpy(),
            "openvino_bf16": lambda: inferencers["bf16"].run_slices(stack).numpy(),
        }
        maps = {name: run() for name, run in backends.items()}  # warm-up; its maps give the parity
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, run in backends.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    rows = {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "times_s": values,
            "speedup_vs_torch": statistics.median(times["torch"]) / statistics.median(values),
            **({} if name == "torch" else {"parity_vs_torch": parity(maps["torch"], maps[name])}),
        }
        for name, values in times.items()
    }
    result = {
        "size_xyz": list(size),
        "slices": int(stack.shape[0]),
        "backbone": DEFAULT_BACKBONE,
        "repeats": args.repeats,
        "export_seconds": export_seconds,
        "bf16_supported": bf16_supported(),
        "torch_threads": torch.get_num_threads(),
        "openvino_threads": openvino_threads,
        "cpu_count": os.cpu_count(),
        "peak_rss_mib": peak_rss_mib(),
        "backends": rows,
        "versions": {"simpleslicenet": __version__, "torch": torch.__version__, "openvino": ov.__version__},
        "cpu": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"),
    }
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")

    print(f"SimpleSliceNet CPU inference, {size[0]}×{size[1]}×{size[2]} (x×y×z), median of {args.repeats}\n")
    print("| backend | median s/volume | min s/volume | speed-up vs torch | max abs diff | max rel diff |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        diff = row.get("parity_vs_torch", {})
        abs_text = f"{diff['max_abs']:.2e}" if diff else "—"
        rel_text = f"{diff['max_rel']:.2e}" if diff else "—"
        print(
            f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['speedup_vs_torch']:.2f}× "
            f"| {abs_text} | {rel_text} |"
        )
    print(
        f"\nexport {export_seconds:.1f} s · bf16 supported: {result['bf16_supported']} · "
        f"threads torch {result['torch_threads']}, OpenVINO {openvino_threads} · peak RSS {result['peak_rss_mib']:.0f} MiB · {result['cpu']}"
    )
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
