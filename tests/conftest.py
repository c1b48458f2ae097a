"""Root fixtures. Helpers shared by tests are plain modules in tests/ (on the path via pyproject's
`pythonpath`): mmtest_utils, packing_checks, analysis_helpers, llava_data."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtest_utils import REPO


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests skip without CUDA, saying so; the terminal summary counts them apart."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    config._mmtrain_gpu_ids = {item.nodeid for item in gpu}
    if gpu and not _cuda_available():
        skip = pytest.mark.skip(reason="gpu: needs a CUDA device (not run here; counted apart, never as passing)")
        for item in gpu:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ids = getattr(config, "_mmtrain_gpu_ids", set())
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "nodeid", None) in ids and (rep.when == "call" or outcome in ("skipped", "error")):
                counts[outcome] = counts.get(outcome, 0) + 1
    if ids:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none run"
        terminalreporter.write_line(f"gpu-marked tests (counted apart from the CPU suite): {len(ids)} collected; {parts}")
