"""The sabotage catalog: each entry breaks one claim of the project in one small edit, and names the
tests that must catch it. Anchors are exact strings that must occur once in the file; when the code
moves, the entry is STALE and must be updated with it (the runner fails on stale entries)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sabotage:
    name: str
    claim: str  # what the broken code violates
    file: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]


SABOTAGES: list[Sabotage] = [
    Sabotage(
        name="packer_drops_a_sample",
        claim="every sample is packed exactly once",
        file="mmtrain/packing/policy.py",
        anchor="            packs.append(ids[p].tolist())",
        replacement="            packs.append(ids[p].tolist()[1:] or ids[p].tolist())",
        tests=("tests/unit/packing/test_algorithms.py",),
    ),
    Sabotage(
        name="cu_seqlens_off_by_one",
        claim="cu_seqlens keep samples apart at their exact boundaries",
        file="mmtrain/steps/batch.py",
        anchor="            bounds.append(offset + used)",
        replacement="            bounds.append(offset + used + (1 if len(bounds) == 1 and used > 1 else 0))",
        tests=("tests/unit/steps/test_batch.py",),
    ),
]
