"""Root fixtures and the suite's skip rule. Helpers shared by tests are plain modules in tests/ (on
the path via pyproject's `pythonpath`): mmtest_utils, packing_checks, analysis_helpers, llava_data.

Only gpu-marked tests skip (without CUDA; counted apart in the summary), and skips someone asked for
(their reason starts with "on request:"); any other skip is turned into a failure."""

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


ON_REQUEST = "on request:"  # the reason of a skip someone asked for (e.g. MMTRAIN_SKIP_SLURM=1)


def _skip_reason(rep) -> str:
    lr = rep.longrepr
    text = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip is never a pass: a test that is not gpu-marked and skips without being asked to (a
    failed import, missing data, a broken fixture) fails instead, saying so."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail") or item.get_closest_marker("gpu") is not None:
        return
    reason = _skip_reason(rep)
    if reason.startswith(ON_REQUEST):
        item.config._mmtrain_on_request = getattr(item.config, "_mmtrain_on_request", 0) + 1
        return
    rep.outcome = "failed"
    rep.longrepr = (f"{item.nodeid} skipped ({reason}), but only gpu-marked tests may skip (and skips asked for, "
                    f"'{ON_REQUEST} ...'): a skipped test is never counted as passing; make it run, or mark it gpu "
                    "if it needs CUDA")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (pytest.skip(allow_module_level=True), importorskip)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped:
        reason = _skip_reason(rep)
        if not reason.startswith(ON_REQUEST):  # gpu modules skip per test (pytestmark), never at import
            rep.outcome = "failed"
            rep.longrepr = f"{collector.nodeid} skipped at collection ({reason}): a module never skips as a whole"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    asked = getattr(config, "_mmtrain_on_request", 0)
    if asked:
        terminalreporter.write_line(f"skipped on request (not run, not counted as passing): {asked}")
    ids = getattr(config, "_mmtrain_gpu_ids", set())
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "nodeid", None) in ids and (rep.when == "call" or outcome in ("skipped", "error")):
                counts[outcome] = counts.get(outcome, 0) + 1
    if ids:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none run"
        terminalreporter.write_line(f"gpu-marked tests (counted apart from the CPU suite): {len(ids)} collected; {parts}")
