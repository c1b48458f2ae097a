"""Tool commands start quietly: at most three warning lines on stderr (megatron-core alone prints
about a dozen about TE / Apex / CUDA when imported without them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

from mmtest_utils import REPO

from mmtrain import quiet


def _stderr(args: list[str], **env) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MMTRAIN_SHOW_WARNINGS")} | env
    r = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stderr


def _warning_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if re.search(r"warn", x, re.IGNORECASE)]


def test_lengths_and_pack_print_at_most_three_warning_lines(tmp_path):
    table = tmp_path / "t.csv"
    err = _stderr(["lengths", "--out", str(table), "model=tiny", "data.num_samples=50"])  # imports megatron-core
    assert len(_warning_lines(err)) <= 3 and len(err.strip().splitlines()) <= 3, err
    err = _stderr(["pack", str(table), "--seq-length", "512", "--buffer-size", "16", "--out", str(tmp_path / "p.jsonl")])
    assert len(_warning_lines(err)) <= 3 and len(err.strip().splitlines()) <= 3, err


def test_filter_keeps_other_warnings(monkeypatch):
    monkeypatch.delenv("MMTRAIN_SHOW_WARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn_explicit("TE not installed", UserWarning, "x.py", 1, module="megatron.core.optimizer")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="mmtrain.steps.stream")
    assert [str(w.message) for w in seen] == ["ours"]
