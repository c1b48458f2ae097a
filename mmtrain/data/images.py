"""Images -> vision-encoder inputs and the number of decoder tokens each image becomes.

Two pipelines behind one interface (`count` from the header size, `pixels` from the file):

* `hf` (data.image_processor=hf, the default under model.pretrained): the model folder's own
  transformers image processor (CLIPImageProcessor / SiglipImageProcessor: resize, crop, rescale,
  normalise), one tile per image as in LLaVA-1.5. How many tokens an image becomes is asked of the
  folder's processor through a small per-family rule (`TOKEN_RULES`, keyed by processor class):
  LLaVA's is `LlavaProcessor.replace_image_token` on the processed pixels (patch_size,
  vision_feature_select_strategy, num_additional_image_tokens), so the expansion is transformers'.
* native (model.vision.type=native, Qwen2-VL / Qwen2.5-VL): `NativeImages`, the folder's
  Qwen2VLImageProcessor (smart resize, flattened patches and a (t, h, w) grid per image); an image
  becomes t*h*w / m^2 merged tokens, as the processor's `replace_image_token` expands it.
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


def _qwen_tokens(processor, grid_thw) -> int:
    """Qwen2VLProcessor's own expansion of one image of grid (t, h, w): its `replace_image_token`."""
    text = processor.replace_image_token({"image_grid_thw": [np.asarray(grid_thw)]}, image_idx=0)
    return text.count(processor.image_token)


# processor class name -> tokens of one processed image: for tile families from its pixels
# ([C, H, W]), for native-resolution families (NATIVE_PROCESSORS) from its grid (t, h, w); without
# a rule the model's tokens per tile is used.
TOKEN_RULES: dict[str, Callable] = {"LlavaProcessor": _llava_tokens, "Qwen2VLProcessor": _qwen_tokens,
                                    "Qwen2_5_VLProcessor": _qwen_tokens}
NATIVE_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


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
        if type(processor).__name__ in NATIVE_PROCESSORS:
            raise ValueError(f"{model_dir}: {type(processor).__name__} is a native-resolution processor, but the model "
                             "config has fixed-size tiles (model.vision.type=tiles); use model=hf for its config.json")
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


class NativeImages:
    """The model folder's Qwen2-VL-style image processor (Qwen2VLImageProcessor): each image resized
    within min/max pixels to multiples of patch x merge (smart resize), a still image repeated to the
    temporal patch, cut into flattened patches in merge-block order; transformers' pixel values.

    Counts come from the header size (no decoding) through `SmartResize` with the processor's own
    settings, checked at start against the processor (its patch count and its token expansion), and
    again against the grid of every image it decodes. A unit is one merged token (the decoder's
    image tokens; m^2 ViT patches): `count` gives (units, tokens), equal."""

    name = "hf"
    native = True
    upright_from_header = True  # the grid depends on the image's shape

    def __init__(self, model_dir: str, *, patch_size: int, merge_size: int, temporal_patch_size: int, channels: int) -> None:
        from mmtrain.data.accounting import SmartResize
        from mmtrain.data.chat import load_processor

        processor = load_processor(model_dir)
        ip = getattr(processor, "image_processor", None) if processor is not None else None
        if ip is None:
            ip = _load_image_processor(model_dir)
        self.processor, self.image_processor = processor, ip
        d = ip.to_dict() if hasattr(ip, "to_dict") else dict(vars(ip))
        theirs = tuple(d.get(k) for k in ("patch_size", "merge_size", "temporal_patch_size"))
        ours = (patch_size, merge_size, temporal_patch_size)
        if theirs != ours:
            raise ValueError(
                f"{model_dir}: its image processor ({type(ip).__name__}) has patch_size, merge_size, temporal_patch_size "
                f"{theirs}, the vision encoder {ours} (model.vision.patch_size / spatial_merge_size / temporal_patch_size)"
            )
        self.acct = SmartResize.from_processor_config(d)
        self.merge = merge_size
        self.patch_dim = channels * temporal_patch_size * patch_size * patch_size
        self._check_against_processor(model_dir)

    def _check_against_processor(self, model_dir: str) -> None:
        """Our counts == the processor's on a few shapes (its patch count, its token expansion) and
        on a decoded probe image (its grid and pixel rows)."""
        ip, proc = self.image_processor, self.processor
        probes = [(37, 53), (300, 40), (24, 260), (1000, 999), (5, 9)]
        rule = TOKEN_RULES.get(type(proc).__name__) if proc is not None else None
        for w, h in probes:
            grid = self.acct.grid_thw(w, h)
            n = getattr(ip, "get_number_of_image_patches", None)
            if n is not None and n(h, w, {}) != self.vit_patches(w, h):
                raise ValueError(f"{model_dir}: {type(ip).__name__} makes {n(h, w, {})} patches of a {w}x{h} image, "
                                 f"smart resize with its settings {self.vit_patches(w, h)}: an image processor mmtrain cannot count")
            if rule is not None and rule(proc, grid) != self.count(w, h)[1]:
                raise ValueError(f"{model_dir}: {type(proc).__name__} expands a {w}x{h} image to {rule(proc, grid)} tokens, "
                                 f"mmtrain to {self.count(w, h)[1]}")
        px, grid = self._process(_probe_image())
        if grid.tolist() != [list(self.acct.grid_thw(53, 37))] or px.shape != (int(grid.prod()), self.patch_dim):
            raise ValueError(f"{model_dir}: {type(ip).__name__} made pixel values {px.shape} with grid {grid.tolist()} of a "
                             f"53x37 image; mmtrain expects grid {list(self.acct.grid_thw(53, 37))} and rows of {self.patch_dim} values "
                             "(model.vision.in_channels x temporal_patch_size x patch_size^2)")

    @property
    def image_shape(self) -> tuple[int]:
        return (self.patch_dim,)

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of an upright image of this size, as the processor's image_grid_thw."""
        return self.acct.grid_thw(width, height)

    def vit_patches(self, width: int, height: int) -> int:
        return self.acct.vit_patches(width, height)

    def count(self, width: int, height: int) -> tuple[int, int]:
        """(units, decoder tokens) of an upright image: both its merged tokens, t*h*w / m^2."""
        tokens = self.acct.image_tokens(width, height)
        return tokens, tokens

    def _process(self, image) -> tuple[np.ndarray, np.ndarray]:
        out = self.image_processor(images=[image], return_tensors="np")
        return np.asarray(out["pixel_values"], dtype=np.float32), np.asarray(out["image_grid_thw"], dtype=np.int64)

    def pixels(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [patches, C*T*p*p], int64 [1, 3] grid): the image as the model's processor prepares it."""
        px, grid = self._process(open_oriented(path))
        return np.ascontiguousarray(px), grid


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
    from mmtrain.models.config import is_native

    kind = image_processor_kind(data_cfg, model_cfg)
    v = model_cfg.vision
    if is_native(model_cfg):
        if kind != "hf":
            raise ValueError("model.vision.type=native reads images with the model folder's image processor "
                             "(data.image_processor=hf); tiles are for fixed-size-tile vision encoders")
        if not model_cfg.pretrained:
            raise ValueError("model.vision.type=native needs model.pretrained=<folder with the Qwen2-VL image processor>")
        return NativeImages(model_cfg.pretrained, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                            temporal_patch_size=v.temporal_patch_size, channels=v.in_channels)
    if kind == "hf":
        if not model_cfg.pretrained:
            raise ValueError("data.image_processor=hf needs model.pretrained=<folder with the image processor>")
        return HFImages(model_cfg.pretrained, tokens_per_tile=tokens_per_tile, image_size=v.image_size, channels=v.in_channels)
    return TileImages(tile_size=v.image_size, channels=v.in_channels, min_tiles=data_cfg.min_tiles,
                      max_tiles=data_cfg.max_tiles, thumbnail=data_cfg.thumbnail, tokens_per_tile=tokens_per_tile)
