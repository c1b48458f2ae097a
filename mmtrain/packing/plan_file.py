"""PLAN.jsonl: one JSON line per pack plus a sidecar PLAN.jsonl.meta.json with the source
fingerprint and the packing parameters, so a plan is never applied to data it was not made for.

A pack line is {"pack": k, "samples": [record ids], "tokens": t}; a plan made for a layout
(`mmtrain pack --dp R --micro-batches M`) adds "step", "rank", "micro_batch": training from it runs
exactly those packs on those ranks in that micro-batch order. Record ids are the source's ids
(the length table's `id` column, else the row number) as strings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "mmtrain.plan/2"


def fingerprint(image_tokens, text_tokens, tiles=None) -> str:
    """sha256 over the int64 length arrays (order matters: plans index rows)."""
    h = hashlib.sha256()
    for name, arr in (("image", image_tokens), ("text", text_tokens), ("tiles", tiles)):
        a = np.zeros(0, np.int64) if arr is None else np.ascontiguousarray(arr, dtype="<i8")
        h.update(f"{name}:{len(a)}:".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def meta_path(path) -> Path:
    return Path(str(path) + ".meta.json")


def write_plan(path, packs, pack_tokens, meta: dict, extra: list[dict] | None = None) -> None:
    """`packs` hold record ids; lines are exactly {"pack", "samples", "tokens"} (+ `extra[k]`)."""
    meta = {**meta, "format": FORMAT}
    with open(path, "w") as f:
        for i, (p, t) in enumerate(zip(packs, pack_tokens)):
            line = {"pack": i, "samples": [str(x) for x in p], "tokens": int(t)}
            if extra is not None:
                line.update(extra[i])
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    meta_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@dataclass
class Plan:
    packs: list[list[str]]  # record ids per pack
    tokens: list[int]
    meta: dict
    lines: list[dict]

    @property
    def has_steps(self) -> bool:
        """Made for a layout: every line names its step, rank and micro-batch."""
        return bool(self.lines) and all(k in self.lines[0] for k in ("step", "rank", "micro_batch"))

    def index_of(self, ids: list[str]) -> dict[str, int]:
        """Record id -> position in `ids` (the source's order), for the ids this plan names;
        refuses ids the data does not have and ids the data holds twice."""
        pos: dict[str, int] = {}
        dup = None
        for k, rid in enumerate(ids):
            if rid in pos and dup is None:
                dup = rid
            pos[rid] = k
        named = {i for p in self.packs for i in p} | set(self.meta.get("truncated", {}))
        if dup is not None and dup in named:
            raise PlanMismatchError(f"record id {dup!r} occurs twice in the data: a plan needs unique ids")
        missing = sorted(named - set(pos))
        if missing:
            raise PlanMismatchError(f"the plan names record ids the data does not have: {missing[:5]}")
        return {i: pos[i] for i in named}


class PlanMismatchError(ValueError):
    pass


def load_plan(path, expected_fingerprint: str | None = None, expected_params: dict | None = None) -> Plan:
    """Read PLAN.jsonl (+ sidecar). Raises PlanMismatchError saying what differs when the plan was
    made for other data (fingerprint) or other parameters (e.g. seq_length)."""
    path = Path(path)
    mp = meta_path(path)
    if not mp.exists():
        raise FileNotFoundError(f"{path}: sidecar {mp.name} with the source fingerprint is missing")
    meta = json.loads(mp.read_text())
    if meta.get("format") != FORMAT:
        raise PlanMismatchError(f"{path} is in format {meta.get('format')!r}, expected {FORMAT!r}: re-run `mmtrain pack`")
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise PlanMismatchError(
            f"{path} was made for source {meta.get('source')!r} with fingerprint {meta.get('fingerprint')} "
            f"({meta.get('samples_in')} rows), but the data has fingerprint {expected_fingerprint}: "
            f"the length table differs; re-run `mmtrain pack`"
        )
    for k, v in (expected_params or {}).items():
        if meta.get("params", {}).get(k) != v:
            raise PlanMismatchError(f"{path}: plan has {k}={meta.get('params', {}).get(k)!r}, expected {v!r}")
    packs, tokens, lines = [], [], []
    with open(path) as f:
        for n, raw in enumerate(f):
            if not raw.strip():
                continue
            line = json.loads(raw)
            if line.get("pack") != len(packs):
                raise ValueError(f"{path}:{n + 1}: expected pack {len(packs)}, found {line.get('pack')}")
            packs.append([str(x) for x in line["samples"]])
            tokens.append(line["tokens"])
            lines.append(line)
    return Plan(packs, tokens, meta, lines)
