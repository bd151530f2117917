"""Benchmark sweep: every registered model on one or more datasets, accuracy, speed and memory side by side.

Example:
    >>> from simpleslicenet.benchmark import run_sweep
    >>> results = run_sweep("configs/benchmark/phantom_quick.yaml")  # doctest: +SKIP

or ``simpleslicenet benchmark configs/benchmark/phantom_quick.yaml``.
"""

from simpleslicenet.benchmark.config import RunSpec, SweepConfig, load_sweep
from simpleslicenet.benchmark.report import summary_table, write_report
from simpleslicenet.benchmark.runner import run_sweep

__all__ = ["RunSpec", "SweepConfig", "load_sweep", "run_sweep", "summary_table", "write_report"]
