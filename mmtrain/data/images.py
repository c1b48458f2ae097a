"""Images -> vision-encoder inputs and the number of decoder tokens each image becomes.

Two pipelines behind one interface (`count` from the header size, `pixels` from the file):

* `hf` (data.image_processor=hf, the default under model.pretrained): the model folder's own
  transformers image processor (CLIPImageProcessor / SiglipImageProcessor: resize, crop, rescale,
  normalise), one tile per image as in LLaVA-1.5. How many tokens an image becomes is asked of the
  folder's processor through a small per-family rule (`TOKEN_RULES`, keyed by processor class):
  LLaVA's is `LlavaProcessor.replace_image_token` on the processed pixels (patch_size,
  vision_feature_select_strategy, num_additional_image_tokens), so the expansion is transformers'.
* `tiles` (data.image_processor=tiles): dynamic tiling (mmtrain.data.accounting) at the ViT's tile
  size, an optional thumbnail tile, CLIP normalisation.

Both apply the EXIF orientation before anything looks at the pixels, as transformers'
`load_image` does; the tiling reads it from the header too, since the grid depends on the shape.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_PROCESSORS = ("hf", "tiles")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def open_oriented(path: str, mode: Optional[str] = None):
    """The decoded image, turned upright by its EXIF orientation (and converted to `mode`)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        out = ImageOps.exif_transpose(im)
    if mode is not None and out.mode != mode:
        out = out.convert(mode)
    return out


def _orientation(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - the header scan already vouched for the file; no EXIF means upright
        return 1


def upright_sizes(paths: Sequence[str], widths: np.ndarray, heights: np.ndarray, workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Header sizes with width and height swapped where the EXIF orientation rotates by 90 degrees."""
    w, h = np.asarray(widths).copy(), np.asarray(heights).copy()
    if not len(paths):
        return w, h
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as ex:
        orient = np.fromiter(ex.map(_orientation, paths), dtype=np.int64, count=len(paths))
    swap = np.isin(orient, _TRANSPOSED)
    w[swap], h[swap] = h[swap], w[swap]
    return w, h


class TileImages:
    """Dynamic tiling at the ViT's tile size (+ an optional thumbnail), CLIP-normalised."""

    name = "tiles"
    upright_from_header = True  # the grid depends on the image's shape

    def __init__(self, *, tile_size: int, channels: int, min_tiles: int, max_tiles: int, thumbnail: bool, tokens_per_tile: int) -> None:
        from mmtrain.data.accounting import TokenAccounting

        if channels not in (1, 3):
            raise ValueError(f"data.image_processor=tiles decodes to 1 or 3 channels, model.vision.in_channels={channels}")
        self.tile_size = tile_size
        self.channels = channels
        self.tokens_per_tile = tokens_per_tile
        self.acct = TokenAccounting(mode="dynamic", tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles,
                                    thumbnail=thumbnail, tokens_per_tile=tokens_per_tile)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.tile_size, self.tile_size)

    def count(self, width: int, height: int) -> tuple[int, int]:
        """(tiles, decoder tokens) of an upright image of this size."""
        tiles = self.acct.tiles(width, height)
        return tiles, tiles * self.tokens_per_tile

    def pixels(self, path: str) -> np.ndarray:
        """float32 [tiles, C, ts, ts]: the grid's tiles row by row, then the thumbnail."""
        from PIL import Image

        ts, c = self.tile_size, self.channels
        im = open_oriented(path, "RGB" if c == 3 else "L")
        cols, rows = self.acct.grid(*im.size)
        views = [im.resize((cols * ts, rows * ts), Image.BICUBIC)]
        thumb = self.acct.thumbnail and cols * rows != 1
        if thumb:
            views.append(im.resize((ts, ts), Image.BICUBIC))
        out = []
        for k, v in enumerate(views):
            a = np.asarray(v, dtype=np.float32) / 255.0
            if a.ndim == 2:
                a = a[:, :, None]
            a = (a - CLIP_MEAN[:c]) / CLIP_STD[:c]
            r, q = (rows, cols) if k == 0 else (1, 1)
            # [r*ts, q*ts, C] -> [r, q, C, ts, ts] -> [r*q, C, ts, ts] (row-major tiles)
            out.append(a.reshape(r, ts, q, ts, c).transpose(0, 2, 4, 1, 3).reshape(r * q, c, ts, ts))
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


# ---- transformers image processors ------------------------------------------------------------------


def _llava_tokens(processor, pixel_values: np.ndarray) -> int:
    """LlavaProcessor's own expansion of one processed image ([C, H, W]); None when the processor
    cannot expand (no patch_size saved with it)."""
    if getattr(processor, "patch_size", None) is None:
        return None
    text = processor.replace_image_token({"pixel_values": [pixel_values]}, image_idx=0)
    return text.count(processor.image_token)


# processor class name -> tokens of one processed image. Families whose count depends on the image
# size (native resolution) add theirs here; without a rule the model's tokens per tile is used.
TOKEN_RULES: dict[str, Callable] = {"LlavaProcessor": _llava_tokens}


class HFImages:
    """The model folder's transformers image processor, one tile per image."""

    name = "hf"
    upright_from_header = False  # every image becomes the same tile whatever its shape

    def __init__(self, model_dir: str, *, tokens_per_tile: int, image_size: int, channels: int) -> None:
        from mmtrain.data.chat import load_processor

        processor = load_processor(model_dir)
        ip = getattr(processor, "image_processor", None) if processor is not None else None
        if ip is None:
            ip = _load_image_processor(model_dir)
        self.processor = processor
        self.image_processor = ip
        probe = self._process(_probe_image())
        c, h, w = probe.shape[1:]
        if (c, h, w) != (channels, image_size, image_size):
            raise ValueError(
                f"{model_dir}: its image processor ({type(ip).__name__}) makes {c}x{h}x{w} inputs, the vision "
                f"encoder takes {channels}x{image_size}x{image_size} (model.vision.in_channels / image_size)"
            )
        rule = TOKEN_RULES.get(type(processor).__name__) if processor is not None else None
        tokens = rule(processor, probe[0]) if rule is not None else None
        tokens = tokens_per_tile if tokens is None else tokens
        if tokens != tokens_per_tile:
            raise ValueError(
                f"{model_dir}: {type(processor).__name__} expands an image to {tokens} tokens, the model makes "
                f"{tokens_per_tile} per tile (patch_size, vision_feature_select_strategy and "
                f"num_additional_image_tokens must agree with config.json)"
            )
        self.tokens = tokens
        self.shape = (c, h, w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def count(self, width: int, height: int) -> tuple[int, int]:
        return 1, self.tokens

    def _process(self, image) -> np.ndarray:
        out = self.image_processor(images=[image], return_tensors="np")["pixel_values"]
        return np.asarray(out, dtype=np.float32)

    def pixels(self, path: str) -> np.ndarray:
        """float32 [1, C, H, W]: the image as the model's processor prepares it."""
        return np.ascontiguousarray(self._process(open_oriented(path)))


def _probe_image():
    from PIL import Image

    return Image.fromarray(np.full((37, 53, 3), 128, np.uint8))


def _load_image_processor(model_dir: str):
    if not os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        raise FileNotFoundError(
            f"{model_dir} has no image processor (preprocessor_config.json / processor_config.json); save the "
            "model's processor there, or use data.image_processor=tiles"
        )
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)


def image_processor_kind(data_cfg, model_cfg) -> str:
    """data.image_processor, defaulting to `hf` under model.pretrained and `tiles` otherwise."""
    kind = data_cfg.image_processor or ("hf" if model_cfg.pretrained else "tiles")
    if kind not in IMAGE_PROCESSORS:
        raise ValueError(f"data.image_processor={kind!r}: choose {' or '.join(IMAGE_PROCESSORS)}")
    return kind


def build_images(data_cfg, model_cfg, tokens_per_tile: int):
    kind = image_processor_kind(data_cfg, model_cfg)
    v = model_cfg.vision
    if kind == "hf":
        if not model_cfg.pretrained:
            raise ValueError("data.image_processor=hf needs model.pretrained=<folder with the image processor>")
        return HFImages(model_cfg.pretrained, tokens_per_tile=tokens_per_tile, image_size=v.image_size, channels=v.in_channels)
    return TileImages(tile_size=v.image_size, channels=v.in_channels, min_tiles=data_cfg.min_tiles,
                      max_tiles=data_cfg.max_tiles, thumbnail=data_cfg.thumbnail, tokens_per_tile=tokens_per_tile)
