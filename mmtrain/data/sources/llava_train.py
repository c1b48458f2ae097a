"""Training / evaluation view of a LLaVA JSON/JSONL dataset (`data=llava_json data.source=...`).

Opening the source checks every record, encodes its conversation with the model's tokenizer and
chat template (mmtrain/data/chat.py) and reads the image headers (no decoding), so the planner gets
exact lengths: text tokens + each image's tokens (mmtrain/data/images.py), images where their
`<image>` stood. Pixels are decoded only when a step needs them. Samples are named by record id
(the `id` field, else file:line) everywhere: errors, data_report.jsonl, metrics, eval scores.

Bad records follow `data.bad_sample_policy`:
* found when opening (malformed record or JSON, placeholders that do not match the images, no
  answer to learn from, missing / corrupt image header): `fail` raises once, listing every bad
  record of the file (up to MAX_LISTED) with what is wrong; `skip` leaves them out, each listed in
  data_report.jsonl and counted (`skipped_samples`).
* an image that passes the header check but fails to decode during training: `fail` raises naming
  the sample and file; `skip` feeds black tiles and masks the sample's loss (the step keeps its
  shape, so all ranks stay in lockstep), counted as `bad_samples` and reported as `bad_image`.

Native-resolution models (Qwen2-VL / Qwen2.5-VL): each image becomes its merged tokens (smart
resize of its upright header size, `NativeImages`), pixels are the processor's flattened patches
with a (t, h, w) grid per image (`Sample.image_grid`); `tiles` counts merged tokens (the unit, one
decoder token each) and `vision_lengths` gives each sample's ViT patches per image for the cost model.

Samples longer than packing.seq_length follow `packing.oversize_policy` here, where the turns are
known: `error` names every such record and the seq_length that fits them; `drop` leaves them out
(reported); `truncate` keeps the sample up to the end of its last whole answer that fits (reported
with how much was kept), and drops it (reported) when not even its first answer fits: an answer is
never cut silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mmtrain.data.chat import Encoded, RecordError, build_encoder, check_placeholders, record_images, record_messages
from mmtrain.data.image_headers import scan_sizes
from mmtrain.data.images import build_images, upright_sizes
from mmtrain.data.report import DataReport
from mmtrain.data.sources.llava_json import read_records
from mmtrain.data.synthetic import IMAGE_TOKEN_ID
from mmtrain.steps.batch import Sample

MAX_LISTED = 20  # bad records named in one `fail` error


class BadSampleError(ValueError):
    """A training sample that cannot be used; the message names the sample, the file and the fix."""


def _fix_hint() -> str:
    return "fix or remove it, or set data.bad_sample_policy=skip to leave such samples out"


def record_id(rec, fallback: str) -> str:
    if isinstance(rec, dict) and rec.get("id") is not None and not isinstance(rec.get("id"), (dict, list)):
        return str(rec["id"])
    return fallback


@dataclass
class _Kept:
    """What opening decided about one usable sample."""

    sid: str
    messages: list[dict]
    files: list[str]
    sizes: list[tuple[int, int]]
    image_tiles: list[int]
    image_tokens: list[int]
    cut: Optional[int] = None  # keep the encoded ids [:cut] (oversize_policy=truncate)
    grids: Optional[list[tuple[int, int, int]]] = None  # native resolution: (t, h, w) patches per image
    kept_images: int = 0  # images inside the kept tokens


class LlavaJsonTrainSource:
    """Shapes for the planner (`ids`, `tiles`, `text_tokens`) and `sample(index, ...)` on demand."""

    def __init__(self, cfg, tokens_per_tile: int, *, source: Optional[str] = None, image_root: Optional[str] = None) -> None:
        d = cfg.data
        path = source or d.source
        if not path:
            raise ValueError("data=llava_json needs data.source=<path to a LLaVA .json/.jsonl>")
        if d.bad_sample_policy not in ("fail", "skip"):
            raise ValueError(f"data.bad_sample_policy must be fail|skip, got {d.bad_sample_policy!r}")
        self.path = path
        root = image_root if source else (image_root or d.image_root)
        self.image_root = root or os.path.dirname(os.path.abspath(path))
        self.policy = d.bad_sample_policy
        self.tokens_per_tile = tokens_per_tile
        self.vocab = cfg.model.decoder.vocab_size
        self.seq_length = cfg.packing.seq_length
        self.oversize_policy = cfg.packing.oversize_policy
        self.loss_on = d.loss_on
        self.encoder = build_encoder(d, cfg.model)
        self.images = build_images(d, cfg.model, tokens_per_tile)
        self.native = bool(getattr(self.images, "native", False))
        self.image_shape = self.images.image_shape
        iid = self.encoder.image_id
        self.image_token_id = iid if iid < self.vocab else IMAGE_TOKEN_ID
        self.report = DataReport(path)
        self.skipped: list[tuple[str, str, str]] = []  # (sample id, file or '', reason)
        self.decode_failed: dict[int, str] = {}  # sample index -> reason (policy skip)
        self._plan_cuts: set[int] = set()  # samples a packing plan truncated (reported once)
        self._open()

    # ---- opening --------------------------------------------------------------------------------
    def _open(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data.source={self.path}: no such file")
        bad: list[tuple[str, str, str]] = []
        pending: list[tuple[_Kept, Encoded]] = []
        bad_lines: list[tuple[str, str]] = []
        for fallback, rec in read_records(self.path, bad_lines):
            sid = record_id(rec, fallback)
            try:
                msgs = record_messages(rec)
                images = record_images(rec)
                check_placeholders(msgs, len(images))
                enc = self.encoder.encode(msgs)
                if len(enc.placeholders) != len(images):
                    raise RecordError(f"the chat template rendered {len(enc.placeholders)} `<image>` for {len(images)} images")
                if not enc.targets.any():
                    raise RecordError("no `gpt` answer to learn from" if self.loss_on == "assistant" else "no text tokens")
            except RecordError as e:
                bad.append((sid, "", str(e)))
                continue
            self._check_vocab(sid, enc)
            files = [os.path.join(self.image_root, p) for p in images]
            pending.append((_Kept(sid, msgs, files, [], [], [], grids=[] if self.native else None), enc))
        for kind, where in bad_lines:
            bad.append((where, "", f"unreadable JSON ({kind})"))

        paths = [f for k, _ in pending for f in k.files]
        w, h, errs = scan_sizes(paths, workers=min(8, max(1, len(paths) // 64 + 1)))
        if self.images.upright_from_header:
            ok = [i for i, e in enumerate(errs) if e is None]
            uw, uh = upright_sizes([paths[i] for i in ok], w[ok], h[ok])
            w[ok], h[ok] = uw, uh
        kept: list[tuple[_Kept, Encoded]] = []
        k = 0
        for rec, enc in pending:
            n = len(rec.files)
            err = next(((rec.files[j], errs[k + j]) for j in range(n) if errs[k + j] is not None), None)
            rec.sizes = [(int(w[k + j]), int(h[k + j])) for j in range(n)]
            k += n
            if err is not None:
                bad.append((rec.sid, err[0], f"image header check failed ({err[1]})"))
                continue
            try:
                for width, height in rec.sizes:
                    t, n_tok = self.images.count(width, height)
                    rec.image_tiles.append(t)
                    rec.image_tokens.append(n_tok)
                    if rec.grids is not None:
                        rec.grids.append(self.images.grid(width, height))
            except ValueError as e:  # e.g. an aspect ratio the native image processor refuses
                bad.append((rec.sid, rec.files[len(rec.image_tokens)], str(e)))
                continue
            kept.append((rec, enc))
        self._bad_records(bad)
        kept = self._oversize(kept)
        if not kept:
            raise BadSampleError(f"{self.path}: no usable samples ({len(self.skipped)} skipped, {self.report.count('dropped')} dropped)")
        self._samples = [r for r, _ in kept]
        self.ids: list[str] = [r.sid for r in self._samples]
        self.files = [r.files for r in self._samples]
        self.sizes = [r.sizes for r in self._samples]
        tiles, text = [], []
        for r, enc in kept:
            n_ids, n_img = (len(enc.ids), len(r.files)) if r.cut is None else (r.cut, int((enc.placeholders < r.cut).sum()))
            r.kept_images = n_img
            tiles.append(sum(r.image_tiles[:n_img]))
            text.append(n_ids - n_img)
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.text_tokens = np.asarray(text, dtype=np.int64)

    def _check_vocab(self, sid: str, enc: Encoded) -> None:
        ids = np.delete(enc.ids, enc.placeholders)
        if len(ids) and int(ids.max()) >= self.vocab:
            raise BadSampleError(
                f"{self.path}: sample {sid!r}: token id {int(ids.max())} is outside the model's vocabulary "
                f"({self.vocab}): {self.encoder.name} does not belong to this model; set data.tokenizer"
            )

    def _bad_records(self, bad: list[tuple[str, str, str]]) -> None:
        if not bad:
            return
        if self.policy == "fail":
            lines = [f"sample {sid!r}{f' (file {f})' if f else ''}: {why}" for sid, f, why in bad[:MAX_LISTED]]
            more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            raise BadSampleError(
                f"{self.path}: {len(bad)} bad record{'s' if len(bad) != 1 else ''}:\n  - " + "\n  - ".join(lines) + more
                + f"\n{_fix_hint()} (each is then listed in data_report.jsonl)"
            )
        for sid, f, why in bad:
            self.skipped.append((sid, f, why))
            self.report.add(sid, "skipped", why, **({"file": f} if f else {}))

    # ---- oversize ---------------------------------------------------------------------------------
    @staticmethod
    def _expanded(enc: Encoded, image_tokens: list[int], cut: int) -> int:
        """Decoder tokens of the encoded ids [:cut] with their images expanded."""
        ph = enc.placeholders[enc.placeholders < cut]
        return cut - len(ph) + sum(image_tokens[: len(ph)])

    def _safe_cut(self, enc: Encoded, image_tokens: list[int], budget: int) -> tuple[Optional[int], int]:
        """(the end of the last whole answer that fits `budget` tokens or None, answers kept)."""
        best, kept = None, 0
        for j, (_, end) in enumerate(enc.answers):
            if self._expanded(enc, image_tokens, int(end)) <= budget:
                best, kept = int(end), j + 1
        return best, kept

    def _oversize(self, kept: list[tuple[_Kept, Encoded]]) -> list[tuple[_Kept, Encoded]]:
        L = self.seq_length
        full = [self._expanded(enc, r.image_tokens, len(enc.ids)) for r, enc in kept]
        over = [i for i, n in enumerate(full) if n > L]
        if not over:
            return kept
        policy = self.oversize_policy
        if policy == "error":
            names = [f"{kept[i][0].sid!r} ({full[i]} tokens)" for i in over[:MAX_LISTED]]
            raise BadSampleError(
                f"{self.path}: {len(over)} sample{'s are' if len(over) > 1 else ' is'} longer than packing.seq_length={L}: "
                + ", ".join(names) + (" ..." if len(over) > MAX_LISTED else "")
                + f"; raise packing.seq_length (>= {max(full[i] for i in over)} fits them all), or set "
                "packing.oversize_policy=truncate (keeps whole answers) or drop"
            )
        drop = set()
        for i in over:
            r, enc = kept[i]
            if policy == "truncate":
                cut, answers = self._safe_cut(enc, r.image_tokens, L)
                if cut is not None:
                    r.cut = cut
                    n = self._expanded(enc, r.image_tokens, cut)
                    self.report.add(r.sid, "truncated", f"{full[i]} tokens > packing.seq_length={L}: kept {n} tokens, "
                                    f"{answers} of {len(enc.answers)} answers whole")
                    continue
                why = f"{full[i]} tokens > packing.seq_length={L} and its first answer does not fit"
            else:
                why = f"{full[i]} tokens > packing.seq_length={L}"
            self.report.add(r.sid, "dropped", why)
            drop.add(i)
        return [x for i, x in enumerate(kept) if i not in drop]

    # ---- counts -----------------------------------------------------------------------------------
    @property
    def skipped_samples(self) -> int:
        return len(self.skipped)

    def data_counts(self) -> dict[str, int]:
        """Samples left out or changed when the source was opened (metrics and summary keys)."""
        return self.report.counts()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vision_lengths(self) -> Optional[list[list[int]]]:
        """Native resolution: each sample's images (those its kept tokens hold) as ViT sequence
        lengths, t*h*w patches each: the per-image quadratic term of the cost model. None for tiles."""
        if not self.native:
            return None
        return [[t * h * w for t, h, w in r.grids[: r.kept_images]] for r in self._samples]

    # ---- samples ----------------------------------------------------------------------------------
    def sample(self, index: int, with_pixels: bool, keep_tokens: Optional[int] = None) -> Sample:
        r = self._samples[index]
        enc = self.encoder.encode(r.messages)
        cut = r.cut
        planned = int(self.tiles[index]) * self.tokens_per_tile + int(self.text_tokens[index])
        ids, targets = enc.ids, enc.targets
        if keep_tokens is not None and keep_tokens < planned:  # a plan that truncated: keep whole answers only
            cut, _ = self._safe_cut(enc, r.image_tokens, keep_tokens)
            if cut is None:  # nothing whole fits: keep what fits, with no answer tokens left to learn
                cut = self._hard_cut(enc, r.image_tokens, keep_tokens)
                targets = np.zeros_like(targets)
            if index not in self._plan_cuts:
                self._plan_cuts.add(index)
                self.report.add(r.sid, "truncated", f"the packing plan keeps {keep_tokens} of {planned} tokens")
        if cut is not None:
            ids, targets = ids[:cut], targets[:cut]
        ph = enc.placeholders[enc.placeholders < len(ids)]
        n_img = len(ph)
        text = np.delete(ids, ph)
        tiles = sum(r.image_tiles[:n_img])
        lengths = np.asarray(r.image_tokens[:n_img], dtype=np.int64)
        if keep_tokens is None and (tiles != int(self.tiles[index]) or len(text) != int(self.text_tokens[index])):
            raise BadSampleError(
                f"{self.path}: sample {r.sid!r} encodes to {len(text)} text tokens and {tiles} tiles now, "
                f"{int(self.text_tokens[index])} and {int(self.tiles[index])} when the source was opened"
            )
        pixels = None
        # Under `skip` every stage decodes (the last PP stage must know to mask the loss).
        if n_img and (with_pixels or self.policy == "skip"):
            pixels = self._pixels_or_black(index, n_img, tiles)
        elif with_pixels:
            pixels = np.zeros((0, *self.image_shape), np.float32)
        grid = np.asarray(r.grids[:n_img], np.int64).reshape(-1, 3) if self.native else None
        return Sample(
            sample_id=index, text=text, pixels=pixels if with_pixels else None, tiles=tiles,
            image_tokens=int(lengths.sum()), image_at=ph - np.arange(n_img), image_lengths=lengths,
            targets=np.delete(targets, ph), image_token_id=self.image_token_id, image_grid=grid,
        )

    def _hard_cut(self, enc: Encoded, image_tokens: list[int], budget: int) -> int:
        """The longest prefix within `budget` tokens that does not split an image."""
        cut = 0
        for c in range(1, len(enc.ids) + 1):
            if self._expanded(enc, image_tokens, c) > budget:
                break
            cut = c
        return max(cut, 1)

    def _decode(self, r: _Kept, n_img: int, tiles: int) -> np.ndarray:
        """The pixels of the sample's first n_img images; raises when they disagree with the header."""
        if not self.native:
            parts = [self.images.pixels(f) for f in r.files[:n_img]]
            px = np.concatenate(parts) if parts else np.zeros((0, *self.image_shape), np.float32)
            if px.shape[0] != tiles:
                raise ValueError(f"decoded {px.shape[0]} tiles, the header said {tiles}")
            return px
        parts = []
        for f, want in zip(r.files[:n_img], r.grids[:n_img]):
            px, grid = self.images.pixels(f)
            if grid.reshape(-1).tolist() != list(want):
                raise ValueError(f"{f}: decoded to a grid of {grid.reshape(-1).tolist()} patches, the header said {list(want)}")
            parts.append(px)
        return np.concatenate(parts) if parts else np.zeros((0, *self.image_shape), np.float32)

    def _pixels_or_black(self, index: int, n_img: int, tiles: int) -> np.ndarray:
        r = self._samples[index]
        if index not in self.decode_failed:
            try:
                return self._decode(r, n_img, tiles)
            except Exception as e:  # noqa: BLE001 - any decoder error is a bad sample
                reason = f"{type(e).__name__}: {e}"
                if self.policy == "fail":
                    raise BadSampleError(
                        f"{self.path}: sample {r.sid!r} (index {index}, file {', '.join(r.files)}): "
                        f"image failed to decode during training ({reason}); {_fix_hint()}"
                    ) from e
                self.decode_failed[index] = reason
                self.report.add(r.sid, "bad_image", f"failed to decode during training ({reason}); loss masked",
                                file=", ".join(r.files))
        rows = sum(t * h * w for t, h, w in r.grids[:n_img]) if self.native else tiles
        return np.zeros((rows, *self.image_shape), np.float32)
