"""Root fixtures. Reusable helpers live in mmtest_utils.py (import it; conftest modules clash by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmtest_utils import REPO  # noqa: E402


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
