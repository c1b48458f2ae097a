"""Root fixtures. Helpers shared by tests are plain modules in tests/ (on the path via pyproject's
`pythonpath`): mmtest_utils, packing_checks, analysis_helpers, llava_data."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtest_utils import REPO


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
