"""What a data source left out or changed, by record id: `<output_dir>/data_report.jsonl`.

One JSON line per sample: {"id", "source", "action", "reason"} with action
  skipped     a bad record or image found when the source was opened (data.bad_sample_policy=skip)
  dropped     longer than packing.seq_length (packing.oversize_policy=drop, or truncate with no
              whole answer fitting)
  truncated   cut after its last whole answer that fits packing.seq_length (oversize_policy=truncate)
  bad_image   an image that failed to decode during training; its loss was masked (policy skip)
Why a file and not only counts: a run that leaves samples out must say which, so they can be fixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

ACTIONS = ("skipped", "dropped", "truncated", "bad_image")
COUNT_KEYS = {"skipped": "skipped_samples", "dropped": "dropped_samples", "truncated": "truncated_samples"}


class DataReport:
    def __init__(self, source: str) -> None:
        self.source = source
        self.entries: list[dict] = []
        self._append_to: Optional[Path] = None

    def add(self, sample_id: str, action: str, reason: str, **extra) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown data report action {action!r}")
        entry = {"id": str(sample_id), "source": self.source, "action": action, "reason": reason, **extra}
        self.entries.append(entry)
        if self._append_to is not None:
            with open(self._append_to, "a") as f:  # one short line per write: safe from several ranks
                f.write(json.dumps(entry) + "\n")

    def count(self, action: str) -> int:
        return sum(e["action"] == action for e in self.entries)

    def counts(self) -> dict[str, int]:
        """{skipped_samples, dropped_samples, truncated_samples}: what the metrics and summary carry."""
        return {key: self.count(action) for action, key in COUNT_KEYS.items()}

    def write(self, path, append: bool = False) -> None:
        """The entries so far (a fresh file unless `append`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.entries)

    def attach(self, path, *, write_now: bool, append_later: bool, append: bool = False) -> None:
        """Write the entries found so far (`write_now`, one process), and append later ones as they
        happen (`append_later`, the processes that find them)."""
        if write_now:
            self.write(path, append=append)
        elif append_later:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._append_to = Path(path) if append_later else None
