"""Fuzzing the NIfTI read path with hypothesis: every damaged file is refused by name or loads sanely.

The damage is made by the case generator of ``benchmarks/fuzz_nifti.py`` (the long run, ≥ 10,000
cases, lives there); here hypothesis draws its choices, a few hundred cases within seconds.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import load_benchmark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

fuzz = load_benchmark("fuzz_nifti")

CASE_SECONDS = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list:
    return fuzz.build_corpus(tmp_path_factory.mktemp("fuzz_corpus"))


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail a case that blocks (a pipe opened for reading, an endless loop) instead of hanging the suite."""

    def expired(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"case took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(
    max_examples=900, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(family=st.sampled_from(fuzz.FAMILIES), rng=st.randoms(use_true_random=False))
def test_damaged_file_is_refused_by_name_or_loads_sanely(corpus: list, family: str, rng) -> None:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as folder:
        case = fuzz.case_from(family, rng, corpus, Path(folder), "case")
        with time_limit(CASE_SECONDS):
            outcome, detail = fuzz.run_case(case)
    assert outcome in {"loaded", "refused"}, f"{family} [{case.operation}]: {outcome}: {detail}"


def test_every_family_is_exercised_and_refusals_name_the_file(corpus: list, tmp_path: Path) -> None:
    # A fixed sample of the benchmark's own cases: each family gives both outcomes it should.
    outcomes = {family: set() for family in fuzz.FAMILIES}
    for index in range(len(fuzz.FAMILIES) * 30):
        case_folder = tmp_path / str(index)
        case_folder.mkdir()
        case = fuzz.make_case(index, seed=0, corpus=corpus, folder=case_folder)
        outcome, detail = fuzz.run_case(case)
        assert outcome in {"loaded", "refused"}, f"case {index} {case.family} [{case.operation}]: {outcome}: {detail}"
        outcomes[case.family].add(outcome)
    # A file that contradicts itself is always refused (run_case counts a load of one as insane).
    always_refused = {"truncate_nii", "truncate_gz", "contradiction"}
    for family, seen in outcomes.items():
        assert "refused" in seen, family
        if family not in always_refused | {"container", "voxel_values", "compressed_flip"}:
            assert "loaded" in seen, family
