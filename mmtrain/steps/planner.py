"""Which samples each optimizer step uses, how they are packed, and which DP rank runs which pack.

Pure bookkeeping over sample shapes (tiles, text tokens): no pixels, no torch. Every rank computes
the same plan from the same seed, so no communication is needed to agree on it, and the state that
resumes it exactly is a few integers plus the online packer's buffer.

Step formation:
* packing off: a step is the next `global_batch_size` samples of the (shuffled) epoch order; DP rank r
  takes the r-th contiguous slice; each sample is a row of its own.
* packing on: samples stream through the online BufferedPacker (`packing.buffer_size`) -- or, with
  an offline plan (`packing.plan`, from `mmtrain pack`), packs come from the plan in its order (later
  epochs shuffle the plan's packs by seed); a step takes whole packs, in order, until it holds
  >= `global_batch_size` samples. With buffer_size equal to
  global_batch_size, a step's packs hold exactly the samples an unpacked step sees, so the global
  per-token loss is identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class StepPlan:
    step: int
    rows: list[tuple[int, ...]]  # sample ids per row (a pack, or one sample when packing is off)
    row_tokens: list[int]  # content tokens per row (before padding)
    rank_micro_batches: list[list[list[int]]]  # [dp rank][micro-batch] -> row indices
    predicted_rank_cost: list[float]
    kept_length: dict[int, int] = field(default_factory=dict)  # truncated samples: id -> kept tokens
    epoch: int = 0

    @property
    def sample_ids(self) -> list[int]:
        return [s for row in self.rows for s in row]

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.rows)

    def num_micro_batches(self, dp_rank: int) -> int:
        return len(self.rank_micro_batches[dp_rank])


@dataclass
class PlannerSettings:
    packing: bool
    seq_length: int
    buffer_size: int
    algorithm: str
    global_batch_size: int
    micro_batch_size: int
    dp: int
    pp: int = 1
    seed: int = 0
    shuffle: bool = True
    balance: bool = True
    balance_strategy: str = "default"
    pipeline_order: bool = True
    max_images_per_pack: Optional[int] = None
    pack_align: int = 1
    segment_align: int = 1
    oversize_policy: str = "error"
    carry_over: bool = False


class StepPlanner:
    def __init__(
        self,
        tiles: np.ndarray,
        text_tokens: np.ndarray,
        tokens_per_tile: int,
        s: PlannerSettings,
        plan_packs: Optional[list[list[int]]] = None,
        plan_kept: Optional[dict[int, int]] = None,
    ) -> None:
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.text = np.asarray(text_tokens, dtype=np.int64)
        self.lengths = self.tiles * tokens_per_tile + self.text
        self.s = s
        self.n = len(self.lengths)
        if self.n == 0:
            raise ValueError("the data source has no samples")
        if s.global_batch_size < 1 or s.micro_batch_size < 1:
            raise ValueError("trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        if not s.packing and s.global_batch_size % (s.dp * s.micro_batch_size):
            raise ValueError(
                f"without packing, trainer.global_batch_size={s.global_batch_size} must be a multiple of "
                f"DP size {s.dp} x trainer.micro_batch_size={s.micro_batch_size}"
            )
        self._cost_model = None
        self.epoch = 0
        self.cursor = 0  # position in the current epoch's order
        self.step = 0
        self.pending: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (sample ids, lengths) of packed rows
        self.plan_packs = plan_packs if s.packing else None
        self.plan_kept = dict(plan_kept or {})
        self.plan_cursor = 0
        if self.plan_packs is not None:
            bad = [i for p in self.plan_packs for i in p if not 0 <= i < self.n]
            if bad:
                raise ValueError(f"packing.plan names sample {bad[0]}, but the data has {self.n} samples")
            if not self.plan_packs:
                raise ValueError("packing.plan holds no packs")
        self.packer = self._new_packer() if s.packing and self.plan_packs is None else None
        self._order = self._epoch_order(0)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "step": self.step,
            "pending": [[list(i), list(l)] for i, l in self.pending],
            "plan_cursor": self.plan_cursor,
            "packer": self.packer.state_dict() if self.packer is not None else None,
        }

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.cursor, self.step = int(d["epoch"]), int(d["cursor"]), int(d["step"])
        self.pending = [(tuple(i), tuple(l)) for i, l in d["pending"]]
        self.plan_cursor = int(d.get("plan_cursor", 0))
        if self.packer is not None and d.get("packer") is not None:
            self.packer.load_state_dict(d["packer"])
        self._order = self._epoch_order(self.epoch)

    # ---- internals ---------------------------------------------------------------------------
    def _new_packer(self):
        from mmtrain.packing.buffered import BufferedPacker

        return BufferedPacker(
            self.s.seq_length,
            self.s.buffer_size,
            self.s.algorithm,
            max_tiles_per_pack=self.s.max_images_per_pack,
            pack_align=self.s.pack_align,
            segment_align=self.s.segment_align,
            oversize_policy=self.s.oversize_policy,
            carry_over=self.s.carry_over,
        )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.s.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.s.seed, epoch]).permutation(self.n)

    def _next_sample(self) -> tuple[int, bool]:
        """(sample id, whether it closed the epoch)."""
        sid = int(self._order[self.cursor])
        self.cursor += 1
        if self.cursor == self.n:
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
            return sid, True
        return sid, False

    def _plan_order(self, epoch: int) -> np.ndarray:
        n = len(self.plan_packs)
        return np.arange(n) if epoch == 0 or not self.s.shuffle else np.random.default_rng([self.s.seed, epoch, 1]).permutation(n)

    def _fill_from_plan(self, need_samples: int) -> None:
        while sum(len(r[0]) for r in self.pending) < need_samples:
            ids = self.plan_packs[int(self._plan_order(self.epoch)[self.plan_cursor])]
            self.plan_cursor += 1
            if self.plan_cursor == len(self.plan_packs):
                self.plan_cursor, self.epoch = 0, self.epoch + 1
            lens = tuple(self.plan_kept.get(i, int(self.lengths[i])) for i in ids)
            self.pending.append((tuple(int(i) for i in ids), lens))

    def _fill_pending(self, need_samples: int) -> None:
        if self.plan_packs is not None:
            return self._fill_from_plan(need_samples)
        assert self.packer is not None
        while sum(len(r[0]) for r in self.pending) < need_samples:
            sid, epoch_end = self._next_sample()
            packs = self.packer.add(sid, int(self.lengths[sid]), int(self.tiles[sid]), int(self.text[sid]))
            if epoch_end:
                packs = list(packs) + list(self.packer.flush())
            self.pending.extend((tuple(p.sample_ids), tuple(p.lengths)) for p in packs)

    @property
    def cost_model(self):
        if self._cost_model is None:
            from mmtrain.balancing.cost import CostModel

            self._cost_model = CostModel.default()
        return self._cost_model

    def set_cost_model(self, model) -> None:
        self._cost_model = model

    def _row_cost(self, ids: Sequence[int], lengths: Sequence[int]) -> float:
        return float(self.cost_model.pack_cost(list(lengths), [int(self.tiles[i]) for i in ids]))

    def _assign(self, costs: list[float], rows: list[tuple[int, ...]]) -> list[list[int]]:
        dp = self.s.dp
        if not self.s.packing:
            per = len(rows) // dp
            return [list(range(r * per, (r + 1) * per)) for r in range(dp)]
        if self.s.balance and dp > 1:
            from mmtrain.balancing.assign import assign_step

            tiles = [sum(int(self.tiles[i]) for i in row) for row in rows]
            return [list(r) for r in assign_step(costs, dp, self.s.balance_strategy, pack_tiles=tiles)]
        return [list(range(r, len(rows), dp)) for r in range(dp)]

    def _micro_batches(self, rank_rows: list[int], costs: list[float]) -> list[list[int]]:
        m = self.s.micro_batch_size
        mbs = [rank_rows[i : i + m] for i in range(0, len(rank_rows), m)]
        if self.s.pp > 1 and self.s.pipeline_order and len(mbs) > 1:
            from mmtrain.balancing.pipeline import order_microbatches

            order = order_microbatches([sum(costs[r] for r in mb) for mb in mbs], self.s.pp)
            mbs = [mbs[i] for i in order]
        return mbs or [[]]  # a rank with nothing to do runs one empty (all-padding) micro-batch

    # ---- the plan ----------------------------------------------------------------------------
    def next_step(self) -> StepPlan:
        epoch = self.epoch
        kept: dict[int, int] = {}
        if self.s.packing:
            self._fill_pending(self.s.global_batch_size)
            rows, row_tokens, taken = [], [], 0
            while taken < self.s.global_batch_size:
                ids, lens = self.pending.pop(0)
                rows.append(ids)
                row_tokens.append(int(sum(lens)))
                taken += len(ids)
                for i, l in zip(ids, lens):
                    if l != self.lengths[i]:
                        kept[i] = int(l)
            costs = [self._row_cost(ids, [kept.get(i, int(self.lengths[i])) for i in ids]) for ids in rows]
        else:
            rows = [(self._next_sample()[0],) for _ in range(self.s.global_batch_size)]
            for (i,) in rows:
                if self.lengths[i] > self.s.seq_length:
                    raise ValueError(
                        f"sample {i} has {self.lengths[i]} tokens, more than packing.seq_length={self.s.seq_length}"
                    )
            row_tokens = [int(self.lengths[i]) for (i,) in rows]
            costs = [self._row_cost(r, [self.lengths[r[0]]]) for r in rows]
        rank_rows = self._assign(costs, rows)
        plan = StepPlan(
            step=self.step,
            rows=rows,
            row_tokens=row_tokens,
            rank_micro_batches=[self._micro_batches(rr, costs) for rr in rank_rows],
            predicted_rank_cost=[float(sum(costs[i] for i in rr)) for rr in rank_rows],
            kept_length=kept,
            epoch=epoch,
        )
        self.step += 1
        return plan
