"""Training view of a LLaVA JSON/JSONL dataset (`data=llava_json data.source=... data.image_root=...`).

Shapes for the planner come from the image headers (no decoding) when the source is opened:
tiles per image by dynamic tiling (tile size = model.vision.image_size, data.min_tiles..max_tiles,
as `mmtrain.data.accounting` defines it) and text tokens from the byte-level tokenizer over
the conversation values (each `<image>` placeholder is replaced by the image tokens, which lead
the sample). Pixels are decoded with Pillow only when a step needs them.

Bad samples follow `data.bad_sample_policy`:
* found when the source is opened (malformed record, missing / zero-size / corrupt / truncated
  image header): `fail` raises naming the sample and file; `skip` leaves them out of the plan and
  counts them (`skipped_samples` in metrics and the summary).
* an image that passes the header check but fails to decode during training: `fail` raises naming
  the sample and file; `skip` feeds a black image and the sample's loss is masked to zero (the step
  keeps its shape, so all ranks stay in lockstep), counted as `bad_samples`.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mmtrain.data.image_headers import scan_sizes
from mmtrain.data.sources.llava_json import check_record, read_records
from mmtrain.data.synthetic import FIRST_TEXT_ID
from mmtrain.data.accounting import TokenAccounting
from mmtrain.data.text import IMAGE_PLACEHOLDER, ByteTokenizer
from mmtrain.steps.batch import Sample

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIP normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class BadSampleError(ValueError):
    """A training sample that cannot be used; the message names the sample, the file and the fix."""


def _fix_hint() -> str:
    return "fix or remove it, or set data.bad_sample_policy=skip to leave such samples out"


class LlavaJsonTrainSource:
    def __init__(self, cfg, tokens_per_tile: int) -> None:
        d = cfg.data
        if not d.source:
            raise ValueError("data=llava_json needs data.source=<path to a LLaVA .json/.jsonl>")
        if d.bad_sample_policy not in ("fail", "skip"):
            raise ValueError(f"data.bad_sample_policy must be fail|skip, got {d.bad_sample_policy!r}")
        self.path = d.source
        self.image_root = d.image_root or os.path.dirname(os.path.abspath(d.source))
        self.policy = d.bad_sample_policy
        self.tokens_per_tile = tokens_per_tile
        self.vocab = cfg.model.decoder.vocab_size
        self.image_size = cfg.model.vision.image_size
        self.channels = cfg.model.vision.in_channels
        if self.channels not in (1, 3):
            raise ValueError(f"llava_json images decode to 1 or 3 channels, model.vision.in_channels={self.channels}")
        self.acct = TokenAccounting(
            mode="dynamic", tile_size=self.image_size, min_tiles=d.min_tiles, max_tiles=d.max_tiles, tokens_per_tile=tokens_per_tile
        )
        self.skipped: list[tuple[str, str, str]] = []  # (sample id, file or '', reason)
        self.decode_failed: dict[int, str] = {}  # sample index -> reason (policy skip)
        self._open()

    # ---- opening: header scan -------------------------------------------------------------------
    def _bad(self, sid: str, file: str, reason: str) -> None:
        if self.policy == "fail":
            where = f" (file {file})" if file else ""
            raise BadSampleError(f"{self.path}: sample {sid!r}{where}: {reason}; {_fix_hint()}")
        self.skipped.append((sid, file, reason))

    def _open(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data.source={self.path}: no such file")
        tok = ByteTokenizer()
        bad_lines: list[tuple[str, str]] = []
        pending = []  # (sid, abs paths, text string)
        for fallback, rec in read_records(self.path, bad_lines):
            sid = str(rec.get("id", fallback)) if isinstance(rec, dict) else fallback
            err, images, _, _ = check_record(rec, tok, max_images=8)
            if err is not None:
                self._bad(sid, "", f"record is unusable ({err})")
                continue
            text = "\n".join(str(t.get("value", "")) for t in rec["conversations"] if isinstance(t, dict))
            pending.append((sid, [os.path.join(self.image_root, p) for p in images], text))
        for kind, where in bad_lines:
            self._bad(where, "", f"unreadable JSON ({kind})")
        paths = [p for _, ps, _ in pending for p in ps]
        w, h, errs = scan_sizes(paths, workers=min(8, max(1, len(paths) // 64 + 1)))
        self.ids: list[str] = []
        self.files: list[list[str]] = []
        self.sizes: list[list[tuple[int, int]]] = []
        self.texts: list[bytes] = []
        tiles, text_tokens = [], []
        k = 0
        for sid, ps, text in pending:
            n = len(ps)
            err = next(((ps[j], errs[k + j]) for j in range(n) if errs[k + j] is not None), None)
            sizes = [(int(w[k + j]), int(h[k + j])) for j in range(n)]
            k += n
            if err is not None:
                self._bad(sid, err[0], f"image header check failed ({err[1]})")
                continue
            body = "".join(text.split(IMAGE_PLACEHOLDER)).encode("utf-8")
            if not body:
                body = b" "
            self.ids.append(sid)
            self.files.append(ps)
            self.sizes.append(sizes)
            self.texts.append(body)
            tiles.append(sum(self.acct.tiles(a, b) for a, b in sizes))
            text_tokens.append(len(body))
        if not self.ids:
            raise BadSampleError(f"{self.path}: no usable samples ({len(self.skipped)} skipped)")
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.text_tokens = np.asarray(text_tokens, dtype=np.int64)

    @property
    def skipped_samples(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.ids)

    # ---- samples --------------------------------------------------------------------------------
    def _text_ids(self, index: int) -> np.ndarray:
        raw = np.frombuffer(self.texts[index], dtype=np.uint8).astype(np.int64)
        return FIRST_TEXT_ID + raw % (self.vocab - FIRST_TEXT_ID)  # fold bytes into the vocab, off the specials

    def _decode(self, index: int) -> np.ndarray:
        """float32 [tiles, C, H, W] of all images of sample `index`; raises on a decode failure."""
        from PIL import Image

        ts = self.image_size
        out = []
        for path, (w, h) in zip(self.files[index], self.sizes[index]):
            with Image.open(path) as im:
                im.load()
                im = im.convert("RGB" if self.channels == 3 else "L")
            cols, rows = self.acct.grid(w, h)
            im = im.resize((cols * ts, rows * ts), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
            if a.ndim == 2:
                a = a[:, :, None]
            a = (a - MEAN[: self.channels]) / STD[: self.channels]
            # [rows*ts, cols*ts, C] -> [rows, cols, C, ts, ts] -> [tiles, C, ts, ts] (row-major tiles)
            t = a.reshape(rows, ts, cols, ts, self.channels).transpose(0, 2, 4, 1, 3).reshape(rows * cols, self.channels, ts, ts)
            out.append(t)
        if not out:
            return np.zeros((0, self.channels, ts, ts), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def sample(self, index: int, with_pixels: bool, keep_tokens: Optional[int] = None) -> Sample:
        tiles = int(self.tiles[index])
        image_tokens = tiles * self.tokens_per_tile
        text = self._text_ids(index)
        if keep_tokens is not None:  # packing.oversize_policy=truncate cuts text, never the image
            text = text[: max(keep_tokens - image_tokens, 1)]
        pixels = None
        # Under `skip` every stage decodes (the last PP stage must know to mask the loss).
        if with_pixels or self.policy == "skip":
            pixels = self._pixels_or_black(index, tiles)
        return Sample(sample_id=index, text=text, pixels=pixels if with_pixels else None, tiles=tiles, image_tokens=image_tokens)

    def _pixels_or_black(self, index: int, tiles: int) -> np.ndarray:
        ts = self.image_size
        if index not in self.decode_failed:
            try:
                px = self._decode(index)
                if px.shape[0] != tiles:
                    raise ValueError(f"decoded {px.shape[0]} tiles, the header said {tiles}")
                return px
            except Exception as e:  # noqa: BLE001 - any decoder error is a bad sample
                reason = f"{type(e).__name__}: {e}"
                if self.policy == "fail":
                    raise BadSampleError(
                        f"{self.path}: sample {self.ids[index]!r} (index {index}, file {', '.join(self.files[index])}): "
                        f"image failed to decode during training ({reason}); {_fix_hint()}"
                    ) from e
                self.decode_failed[index] = reason
        return np.zeros((tiles, self.channels, ts, ts), np.float32)
