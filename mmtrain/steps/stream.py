"""The step stream: which samples each optimizer step uses, how they are packed, and which DP rank
runs which pack in which micro-batch.

Pure bookkeeping over sample shapes (tiles, text tokens): no pixels, no torch. Every rank computes
the same steps from the same seed, so no communication is needed to agree on them, and the state
that resumes them exactly is plain JSON (position in the epoch order, the online packer's buffer,
the packs waiting for a window, the steps of the current window) -- none of it depends on the DP
size, so a run can resume at another DP size with the same samples per step.

Step semantics (`trainer.global_batch_size` counts sequences per step, as in Megatron-LM):
* packing on (default): a sequence is a pack. Samples of the shuffled epoch order stream through
  the online packer (`packing.buffer_size`); its packs collect into a window of at least
  `balancing.window_steps` steps (whole packer buffers), and the step assembler
  (`mmtrain.balancing.assemble`) cuts the window into steps of exactly global_batch_size packs,
  then lays each step out over the DP ranks as it runs: every rank gets global_batch_size / dp
  packs in micro-batches of trainer.micro_batch_size. The samples per step vary. At the end of an
  epoch the last packs are re-packed so that the count fills whole steps: no rank ever idles.
* `packing.strict_equivalence`: a step is the next global_batch_size samples, packed among
  themselves (as many packs as it takes, a multiple of dp x micro_batch_size), so packed and
  unpacked runs see the same samples and give the same losses.
* packing off: a step is the next global_batch_size samples, each a row of its own; DP rank r
  takes the r-th contiguous slice.
* a plan file (`packing.plan` from `mmtrain pack --dp R --micro-batches M`): every step, every
  rank, the plan's packs in the plan's micro-batch order; later epochs run the plan's steps in a
  seeded order. A plan written without --dp is a pack stream that replaces the online packer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mmtrain.balancing.assemble import complete_steps, form_steps, layout_step, step_figures, validate_shape
from mmtrain.balancing.cost import CostModel, tiled_terms

Pack = tuple[tuple[int, ...], tuple[int, ...]]  # (sample indices, their decoder lengths after truncation)


@dataclass
class Step:
    step: int
    epoch: int
    rows: list[tuple[int, ...]]  # sample indices per row (a pack, or one sample when packing is off)
    row_tokens: list[int]  # content tokens per row (before padding)
    rank_micro_batches: list[list[list[int]]]  # [dp rank][micro-batch] -> row indices, in run order
    row_costs: list[float]
    predicted_rank_cost: list[float]
    predicted_bubble: Optional[float] = None  # 1F1B idle share of this step's order (PP > 1)
    kept_length: dict[int, int] = field(default_factory=dict)  # truncated samples: index -> kept tokens

    @property
    def sample_ids(self) -> list[int]:
        return [s for row in self.rows for s in row]

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.rows)

    def rank_samples(self, dp_rank: int) -> list[int]:
        """Sample indices DP rank `dp_rank` runs, in run order (micro-batches, then rows, then samples)."""
        return [s for mb in self.rank_micro_batches[dp_rank] for r in mb for s in self.rows[r]]

    def num_micro_batches(self, dp_rank: int) -> int:
        return len(self.rank_micro_batches[dp_rank])


@dataclass
class StreamSettings:
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
    strategy: str = "default"
    pipeline_order: bool = True
    window_steps: int = 32
    strict_equivalence: bool = False
    max_tiles_per_pack: Optional[int] = None
    pack_align: int = 1
    segment_align: int = 1
    oversize_policy: str = "error"
    carry_over: bool = True
    calibrate_steps: int = 0


@dataclass
class PlanSteps:
    """A plan file's steps: [step][rank][micro-batch] -> packs (sample indices), made for (dp, M, mbs)."""

    steps: list[list[list[list[tuple[int, ...]]]]]
    dp: int
    micro_batches: int
    micro_batch_size: int
    source: str = "plan"


class StepStream:
    def __init__(
        self,
        tiles: np.ndarray,
        text_tokens: np.ndarray,
        tokens_per_tile: int,
        s: StreamSettings,
        cost_model: CostModel,
        *,
        ids: Optional[Sequence[str]] = None,
        plan_packs: Optional[list[list[int]]] = None,
        plan_steps: Optional[PlanSteps] = None,
        plan_kept: Optional[dict[int, int]] = None,
        vision_sq: Optional[np.ndarray] = None,
    ) -> None:
        self.tiles = np.asarray(tiles, dtype=np.int64)
        # native images: per sample the sum of (ViT patches of an image)^2, the quadratic ViT term
        self.vision_sq = None if vision_sq is None else np.asarray(vision_sq, dtype=np.float64)
        self.text = np.asarray(text_tokens, dtype=np.int64)
        self.lengths = self.tiles * tokens_per_tile + self.text
        self.ids = [str(i) for i in (ids if ids is not None else range(len(self.lengths)))]
        self.s = s
        self.n = len(self.lengths)
        if self.n == 0:
            raise ValueError("the data source has no samples")
        if s.global_batch_size < 1 or s.micro_batch_size < 1:
            raise ValueError("trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        if s.window_steps < 1:
            raise ValueError(f"balancing.window_steps={s.window_steps} must be >= 1")
        if not s.packing or s.strict_equivalence or plan_steps is None:
            validate_shape(s.global_batch_size, s.dp, s.micro_batch_size)
        self.cost_model = cost_model
        self._base_cost_model = cost_model
        self.epoch = 0  # epoch of the next sample the order hands out
        self.cursor = 0  # position in that epoch's order
        self.step = 0
        self.window = 0  # windows assembled in the current epoch (seeds their step order)
        self.pending: list[Pack] = []  # packed, not yet in a window
        self.pending_epoch = 0
        self.queue: list[list[Pack]] = []  # the current window's steps still to run (DP-independent)
        self.queue_epoch = 0
        self.observations: list[list[float]] = []  # calibration: [4 FLOP terms..., seconds] per rank-step
        self.calibrated: Optional[dict] = None
        self.plan_steps = plan_steps if s.packing else None
        self.plan_packs = plan_packs if s.packing and plan_steps is None else None
        self.plan_kept = dict(plan_kept or {})
        self.plan_cursor = 0
        if self.plan_steps is not None:
            self._check_plan_steps()
        if self.plan_packs is not None:
            bad = [i for p in self.plan_packs for i in p if not 0 <= i < self.n]
            if bad:
                raise ValueError(f"packing.plan names sample {bad[0]}, but the data has {self.n} samples")
            if not self.plan_packs:
                raise ValueError("packing.plan holds no packs")
        self.packer = self._new_packer() if s.packing and self.plan_packs is None and self.plan_steps is None else None
        self._order = self._epoch_order(0)

    # ---- modes ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        if not self.s.packing:
            return "unpacked"
        if self.plan_steps is not None:
            return "plan_steps"
        return "strict" if self.s.strict_equivalence else "balanced"

    def _check_plan_steps(self) -> None:
        p, s = self.plan_steps, self.s
        m = s.global_batch_size // (s.dp * s.micro_batch_size) if s.global_batch_size % (s.dp * s.micro_batch_size) == 0 else None
        if (p.dp, p.micro_batches, p.micro_batch_size) != (s.dp, m, s.micro_batch_size):
            raise ValueError(
                f"packing.plan {p.source} was made for DP {p.dp} x {p.micro_batches} micro-batches of {p.micro_batch_size} "
                f"pack(s) per rank, but this run has DP {s.dp} x "
                f"{m if m is not None else f'{s.global_batch_size}/({s.dp}x{s.micro_batch_size})'} micro-batches of "
                f"{s.micro_batch_size} (trainer.global_batch_size={s.global_batch_size}); re-run `mmtrain pack --dp {s.dp} "
                f"--micro-batches {m if m is not None else '?'}` or match the run to the plan"
            )
        bad = [i for st in p.steps for r in st for mb in r for pk in mb for i in pk if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"packing.plan {p.source} names sample index {bad[0]}, but the data has {self.n} samples")

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "step": self.step,
            "window": self.window,
            "pending": [[list(i), list(l)] for i, l in self.pending],
            "pending_epoch": self.pending_epoch,
            "queue": [[[list(i), list(l)] for i, l in st] for st in self.queue],
            "queue_epoch": self.queue_epoch,
            "plan_cursor": self.plan_cursor,
            "packer": self.packer.state_dict() if self.packer is not None else None,
            "calibration": {"observations": self.observations, "cost_model": self.calibrated},
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("mode", self.mode) != self.mode:
            raise ValueError(f"the data state was saved in {d['mode']} mode, this run is in {self.mode} mode")
        self.epoch, self.cursor, self.step = int(d["epoch"]), int(d["cursor"]), int(d["step"])
        self.window = int(d.get("window", 0))
        self.pending = [(tuple(i), tuple(l)) for i, l in d["pending"]]
        self.pending_epoch = int(d.get("pending_epoch", 0))
        self.queue = [[(tuple(i), tuple(l)) for i, l in st] for st in d.get("queue", [])]
        self.queue_epoch = int(d.get("queue_epoch", 0))
        self.plan_cursor = int(d.get("plan_cursor", 0))
        if self.packer is not None and d.get("packer") is not None:
            self.packer.load_state_dict(d["packer"])
        cal = d.get("calibration") or {}
        self.observations = [list(map(float, o)) for o in cal.get("observations", [])]
        self.calibrated = cal.get("cost_model")
        if self.calibrated is not None:
            self.cost_model = CostModel.from_dict(self.calibrated)
        self._order = self._epoch_order(self.epoch)

    # ---- samples and packs ---------------------------------------------------------------------
    def _new_packer(self, buffer_size: Optional[int] = None, carry_over: Optional[bool] = None):
        from mmtrain.packing.buffered import BufferedPacker

        return BufferedPacker(
            self.s.seq_length,
            buffer_size or self.s.buffer_size,
            self.s.algorithm,
            max_tiles_per_pack=self.s.max_tiles_per_pack,
            pack_align=self.s.pack_align,
            segment_align=self.s.segment_align,
            oversize_policy=self.s.oversize_policy,
            carry_over=self.s.carry_over if carry_over is None else carry_over,
        )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.s.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.s.seed, epoch]).permutation(self.n)

    def _next_sample(self) -> tuple[int, bool]:
        """(sample index, whether it closed the epoch)."""
        sid = int(self._order[self.cursor])
        self.cursor += 1
        if self.cursor == self.n:
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
            return sid, True
        return sid, False

    def _add(self, packer, sid: int) -> list[Pack]:
        try:
            out = packer.add(sid, int(self.lengths[sid]), int(self.tiles[sid]), int(self.text[sid]))
        except ValueError as e:  # the packer saw one sample: name it by its record id and the keys that fix it
            why = str(e).split(": ", 1)[-1].split(";", 1)[0]
            limit = self.s.max_tiles_per_pack
            fix = (f"raise packing.max_tiles_per_pack (now {limit}) to at least {int(self.tiles[sid])}"
                   if limit is not None and int(self.tiles[sid]) > limit else
                   f"raise packing.seq_length (now {self.s.seq_length}) to at least {int(self.lengths[sid])}")
            raise ValueError(f"sample {self.ids[sid]!r} (index {sid}) is oversize: {why}; {fix}, "
                             "or set packing.oversize_policy=truncate|drop") from None
        return [(tuple(p.sample_ids), tuple(p.lengths)) for p in out]

    def _next_plan_pack(self) -> tuple[Pack, bool]:
        n = len(self.plan_packs)
        if getattr(self, "_plan_order", (None,))[0] != self.epoch:
            perm = np.arange(n) if self.epoch == 0 or not self.s.shuffle else \
                np.random.default_rng([self.s.seed, self.epoch, 1]).permutation(n)
            self._plan_order = (self.epoch, perm)
        ids = self.plan_packs[int(self._plan_order[1][self.plan_cursor])]
        self.plan_cursor += 1
        end = self.plan_cursor == n
        if end:
            self.plan_cursor, self.epoch = 0, self.epoch + 1
        lens = tuple(self.plan_kept.get(i, int(self.lengths[i])) for i in ids)
        return (tuple(int(i) for i in ids), lens), end

    # ---- costs ---------------------------------------------------------------------------------
    def pack_costs(self, packs: Sequence[Pack], model: Optional[CostModel] = None) -> np.ndarray:
        """Cost of each pack: the sum of its samples' costs (varlen: no cross-sample attention)."""
        return self.pack_terms(packs) @ (model or self.cost_model).coefficients

    def sample_vision_sq(self, ids) -> Optional[np.ndarray]:
        return None if self.vision_sq is None else self.vision_sq[np.asarray(ids, dtype=np.int64)]

    def pack_terms(self, packs: Sequence[Pack]) -> np.ndarray:
        """The four work terms of each pack (`mmtrain.balancing.cost.TERMS`), [packs, 4]."""
        if not packs:
            return np.zeros((0, 4))
        ids = np.fromiter((i for p in packs for i in p[0]), dtype=np.int64)
        lens = np.fromiter((l for p in packs for l in p[1]), dtype=np.int64)
        per = tiled_terms(lens, self.tiles[ids], self.cost_model.tile_length, self.sample_vision_sq(ids))
        starts = np.cumsum([0] + [len(p[0]) for p in packs[:-1]])
        return np.add.reduceat(per, starts, axis=0)

    # ---- windows (packing on, balanced) --------------------------------------------------------
    def _packs_per_step(self) -> int:
        return self.s.global_batch_size

    def _complete(self, packs: list[Pack], slots: int) -> list[Pack]:
        """Re-pack so the count is a multiple of `slots` (at least one): the end of an epoch."""
        from mmtrain.packing.algorithms import align_up, effective_capacity

        length_of = {i: l for ids, lens in packs for i, l in zip(ids, lens)}
        order = sorted(length_of)
        local = {i: k for k, i in enumerate(order)}
        lens = np.array([length_of[i] for i in order], dtype=np.int64)
        tl = self.tiles[np.asarray(order, dtype=np.int64)]
        costs = self.cost_model.tiled_costs(lens, tl, self.sample_vision_sq(order))
        out = complete_steps(
            [[local[i] for i in ids] for ids, _ in packs], align_up(lens, max(self.s.segment_align, 1)), costs,
            slots, effective_capacity(self.s.seq_length, max(self.s.pack_align, 1)),
            sample_tiles=tl, max_tiles_per_pack=self.s.max_tiles_per_pack,
        )
        return [(tuple(order[k] for k in p), tuple(int(lens[k]) for k in p)) for p in out]

    def _fill_queue(self) -> None:
        """Assemble the next window into steps (DP-independent) when the current one is used up.

        A window takes every pending pack once there are enough for `window_steps` steps; when
        less than one more packer buffer of the epoch is left, it runs on to the end of the epoch
        (so the epoch's last window is never a small one). Packs the step formation defers wait
        for the next window; the last window of an epoch defers nothing."""
        p = self._packs_per_step()
        want = self.s.window_steps * p
        epoch_end = False
        if not self.pending:
            self.pending_epoch = self.epoch
        while True:
            if self.plan_packs is not None:
                if len(self.pending) >= want and len(self.plan_packs) - self.plan_cursor >= want:
                    break
                pack, epoch_end = self._next_plan_pack()
                self.pending.append(pack)
            else:
                if len(self.pending) >= want and self.n - self.cursor >= self.s.buffer_size:
                    break
                sid, epoch_end = self._next_sample()
                self.pending.extend(self._add(self.packer, sid))
                if epoch_end:
                    self.pending.extend((tuple(q.sample_ids), tuple(q.lengths)) for q in self.packer.flush())
            if epoch_end:
                break
        window = self._complete(self.pending, p) if epoch_end else self.pending
        epoch = self.pending_epoch
        steps, deferred = form_steps(self.pack_costs(window), p, self.s.strategy,
                                     seed=[self.s.seed, epoch, self.window],
                                     max_defer=0 if epoch_end else len(window) % p + 2 * p)
        self.queue = [[window[i] for i in st] for st in steps]
        self.pending = [window[i] for i in deferred]
        self.queue_epoch = epoch
        self.window += 1
        if epoch_end:
            self.window = 0
            self.pending_epoch = self.epoch

    # ---- one step ------------------------------------------------------------------------------
    def _layout(self, packs: list[Pack], epoch: int, kept_from: dict[int, int] | None = None,
                given: Optional[list[list[list[int]]]] = None) -> Step:
        costs = self.pack_costs(packs)
        if given is None:
            tiles = [float(self.tiles[list(ids)].sum()) for ids, _ in packs]
            vw = max(0.1, self._vision_fraction(packs))
            ranks = layout_step(costs, self.s.dp, self.s.micro_batch_size, strategy=self.s.strategy,
                                pack_tiles=tiles, num_stages=self.s.pp, pipeline_order=self.s.pipeline_order,
                                vision_weight=vw)
        else:
            ranks = given
        kept = dict(kept_from or {})
        for ids, lens in packs:
            for i, l in zip(ids, lens):
                if l != self.lengths[i]:
                    kept[i] = int(l)
        figs = step_figures([[float(costs[mb].sum()) for mb in r] for r in ranks], self.s.pp)
        return Step(
            step=self.step,
            epoch=epoch,
            rows=[ids for ids, _ in packs],
            row_tokens=[int(sum(lens)) for _, lens in packs],
            rank_micro_batches=ranks,
            row_costs=[float(c) for c in costs],
            predicted_rank_cost=[float(sum(costs[i] for mb in r for i in mb)) for r in ranks],
            predicted_bubble=figs.get("bubble"),
            kept_length=kept,
        )

    def _vision_fraction(self, packs: list[Pack]) -> float:
        t = self.pack_terms(packs) * self.cost_model.coefficients
        total = t.sum()
        return float(t[:, 2:].sum() / total) if total > 0 else 0.0

    def _unpacked_step(self) -> Step:
        g = self.s.global_batch_size
        epoch = self.epoch
        rows = [(self._next_sample()[0],) for _ in range(g)]
        for (i,) in rows:
            if self.lengths[i] > self.s.seq_length:
                raise ValueError(
                    f"sample {self.ids[i]!r} (index {i}) has {self.lengths[i]} tokens, more than "
                    f"packing.seq_length={self.s.seq_length}"
                )
        packs = [((i,), (int(self.lengths[i]),)) for (i,) in rows]
        per = g // self.s.dp
        m = self.s.micro_batch_size
        ranks = [[list(range(r * per + j, min(r * per + j + m, (r + 1) * per))) for j in range(0, per, m)]
                 for r in range(self.s.dp)]
        return self._layout(packs, epoch, given=ranks)

    def _strict_step(self) -> Step:
        """The next global_batch_size samples, packed among themselves (no carry), then made a
        multiple of dp x micro_batch_size packs."""
        epoch = self.epoch
        packer = self._new_packer(self.s.global_batch_size, carry_over=False)
        packs: list[Pack] = []
        for _ in range(self.s.global_batch_size):
            sid, _ = self._next_sample()
            packs.extend(self._add(packer, sid))
        packs.extend((tuple(q.sample_ids), tuple(q.lengths)) for q in packer.flush())
        return self._layout(self._complete(packs, self.s.dp * self.s.micro_batch_size), epoch)

    def _plan_step(self) -> Step:
        p = self.plan_steps
        k = self.step
        epoch, j = divmod(k, len(p.steps))
        order = np.arange(len(p.steps)) if epoch == 0 or not self.s.shuffle else \
            np.random.default_rng([self.s.seed, epoch, 2]).permutation(len(p.steps))
        st = p.steps[int(order[j])]
        packs: list[Pack] = []
        ranks: list[list[list[int]]] = []
        for r in st:
            rank = []
            for mb in r:
                rows = []
                for ids in mb:
                    rows.append(len(packs))
                    packs.append((tuple(ids), tuple(self.plan_kept.get(i, int(self.lengths[i])) for i in ids)))
                rank.append(rows)
            ranks.append(rank)
        self.epoch = (k + 1) // len(p.steps)
        return self._layout(packs, epoch, given=ranks)

    def next_step(self) -> Step:
        mode = self.mode
        if mode == "unpacked":
            out = self._unpacked_step()
        elif mode == "strict":
            out = self._strict_step()
        elif mode == "plan_steps":
            out = self._plan_step()
        else:
            if not self.queue:
                self._fill_queue()
            out = self._layout(self.queue.pop(0), self.queue_epoch)
        self.step += 1
        return out

    # ---- online calibration --------------------------------------------------------------------
    def observe(self, step: Step, rank_seconds: Sequence[float]) -> Optional[dict]:
        """Record each DP rank's measured forward/backward seconds of `step`; after
        `calibrate_steps` steps (the first step, a warm-up, is not used) fit the cost model to
        them and use it from now on. Returns the fit (to log) when it happens, else None."""
        n = self.s.calibrate_steps
        if n <= 0 or self.calibrated is not None or step.step == 0:
            return None
        flops = self._base_cost_model.coefficients
        for r, secs in enumerate(rank_seconds):
            rows = [i for mb in step.rank_micro_batches[r] for i in mb]
            terms = self.pack_terms([(step.rows[i], tuple(step.kept_length.get(s, int(self.lengths[s])) for s in step.rows[i]))
                                     for i in rows]).sum(axis=0) * flops
            self.observations.append([float(x) for x in terms] + [float(secs)])
        if len(self.observations) < n * self.s.dp:
            return None
        from mmtrain.balancing.calibrate import fit_term_weights

        obs = np.asarray(self.observations, dtype=np.float64)
        w, intercept, resid = fit_term_weights(obs[:, :4], obs[:, 4])
        self.cost_model = self._base_cost_model.scaled(w, unit="s")
        self.calibrated = self.cost_model.to_dict()
        if self.queue and self.mode == "balanced":  # re-form the window's remaining steps with the new costs
            packs = [pk for st in self.queue for pk in st]
            p = self._packs_per_step()
            steps, _ = form_steps(self.pack_costs(packs), p, self.s.strategy, seed=[self.s.seed, self.queue_epoch, self.step])
            self.queue = [[packs[i] for i in st] for st in steps]
        return {"cost_model": self.calibrated, "term_weights": [float(x) for x in w], "intercept_s": intercept,
                "relative_residual": resid, "observations": int(obs.shape[0])}
