"""Tiny random transformers Qwen2-VL / Qwen2.5-VL models for the tests (nothing downloaded), real
Pillow images of different sizes through transformers' Qwen2VLImageProcessor, and packed streams.

  qwen2_vl    ViT: LayerNorm, QuickGELU fc1/fc2, full attention; decoder: tied embeddings, one
              sliding-window layer, mRoPE [2, 3, 3], theta 1e6
  qwen2_5_vl  ViT: RMSNorm, SwiGLU, 56 px windows (2x2 merged tokens) except block 1; decoder:
              untied embeddings, mRoPE [4, 2, 2]
Both: vocab_size 160 > the 150 tokens of the tokenizer (as real Qwen checkpoints are), which TP
pads further to 256. Every parameter is perturbed away from its init so that a tensor mapped to the
wrong place, or not at all, shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hf_models import perturb

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
VOCAB = 160  # the checkpoint's
TOKENIZER = 150  # the tokenizer's: ids 150..159 exist only in the model
WORDS = 144  # ordinary text ids 0..143
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 144, 145, 146, 147
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24
# (width, height): wide, tall, small (min_pixels scales it up), large (max_pixels scales it down),
# and sizes whose merged grids leave partial windows
IMAGE_SIZES = [(100, 60), (45, 130), (20, 30), (300, 250), (200, 90), (70, 70)]


def hf_config(family: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
    ids = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    vis = dict(num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if family == "qwen2_vl":
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                    use_sliding_window=True, sliding_window=6, max_window_layers=1)
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, hidden_act="quick_gelu", **vis)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if family == "qwen2_5_vl":
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=64, hidden_act="silu",
                      window_size=56, fullatt_block_indexes=[1], **vis)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    raise KeyError(family)


def model_class(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[family]


def make_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = model_class(family)(cfg).eval()
    return perturb(model, seed + 1, norms=("norm", "ln_q"))


def image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE,
                                 temporal_patch_size=TEMPORAL)


def make_image(width: int, height: int, seed: int):
    """A real RGB Pillow image with structure (gradients and noise), not a constant."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


def process(images) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [patches, 3*2*14*14], image_grid_thw [n, 3]) from transformers' processor."""
    if not images:
        return torch.zeros(0, 3 * TEMPORAL * PATCH * PATCH), torch.zeros(0, 3, dtype=torch.long)
    out = image_processor()(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


def make_samples(n_images_per_sample=(1, 0, 2, 1), seed: int = 0) -> list[dict]:
    """Samples whose images (of different sizes) stand anywhere in the text, each as
    <|vision_start|> <|image_pad|> x tokens <|vision_end|>; one sample is text only."""
    g = torch.Generator().manual_seed(seed)
    sizes = iter(IMAGE_SIZES * 4)
    out = []
    for i, k in enumerate(n_images_per_sample):
        imgs = [make_image(*next(sizes), seed=100 * seed + 10 * i + j) for j in range(k)]
        pixels, grid = process(imgs)
        text = torch.randint(0, WORDS, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        cuts = sorted(torch.randint(0, len(text) + 1, (k,), generator=g).tolist())  # images between words
        parts: list[int] = []
        for j, (a, b) in enumerate(zip([0] + cuts, cuts + [len(text)])):
            parts += text[a:b]
            if j < k:
                parts += [VISION_START] + [IMAGE_PAD] * (int(grid[j].prod()) // MERGE**2) + [VISION_END]
        if k:
            parts += torch.randint(0, WORDS, (3,), generator=g).tolist()
        out.append({"input_ids": torch.tensor(parts, dtype=torch.long), "pixels": pixels, "grid": grid})
    return out


def hf_forward(model, sample: dict):
    kw = {}
    if sample["grid"].shape[0]:
        kw = dict(pixel_values=sample["pixels"], image_grid_thw=sample["grid"])
    ids = sample["input_ids"][None]
    with torch.no_grad():
        return model(input_ids=ids, mm_token_type_ids=(ids == IMAGE_PAD).int(), **kw)


def hf_logits(model, sample: dict) -> torch.Tensor:
    return hf_forward(model, sample).logits[0].float()


def hf_rope_index(model, sample: dict) -> torch.Tensor:
    """transformers' get_rope_index [3, L] (text-only samples: its arange default)."""
    ids = sample["input_ids"][None]
    if sample["grid"].shape[0] == 0:
        return torch.arange(ids.shape[1]).expand(3, -1)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE_PAD).int(), image_grid_thw=sample["grid"])
    return pos[:, 0]


def image_starts(input_ids: torch.Tensor) -> list[int]:
    """Index of the first <|image_pad|> of every image run."""
    is_img = (input_ids == IMAGE_PAD).long()
    prev = torch.cat([torch.zeros(1, dtype=torch.long), is_img[:-1]])
    return ((is_img == 1) & (prev == 0)).nonzero().flatten().tolist()


def packed_inputs(samples: list[dict]) -> dict:
    """One thd stream of the samples: tokens, next-token labels (0 after each sample's last token),
    1-D and mRoPE positions (restarting per sample, mRoPE from mmtrain's own get_rope_index),
    cu_seqlens, every image's patches in one tensor with the grids, image token positions."""
    from mmtrain.models.mrope import packed_mrope_position_ids

    tokens = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([torch.cat([s["input_ids"][1:], torch.zeros(1, dtype=torch.long)]) for s in samples])
    pos = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])
    mpos = packed_mrope_position_ids([(len(s["input_ids"]), image_starts(s["input_ids"]), s["grid"].numpy()) for s in samples], MERGE)
    lens = torch.tensor([len(s["input_ids"]) for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": pos,
        "mrope_position_ids": torch.from_numpy(mpos),
        "cu_seqlens": cu,
        "max_seqlen": int(lens.max()),
        "images": torch.cat([s["pixels"] for s in samples]),
        "image_grid_thw": torch.cat([s["grid"] for s in samples]),
        "image_token_index": (tokens == IMAGE_PAD).nonzero().flatten(),
        "spans": list(zip(cu[:-1].tolist(), cu[1:].tolist())),
    }


def hf_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[:-1].gather(1, input_ids[1:, None])[:, 0]


def save_processor(out: Path) -> None:
    """A word-level tokenizer of TOKENIZER (< VOCAB) tokens with Qwen's special tokens, and the image
    / video processors, saved as a Qwen2VLProcessor next to the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor, Qwen2VLVideoProcessor

    special = {VISION_START: "<|vision_start|>", VISION_END: "<|vision_end|>", IMAGE_PAD: "<|image_pad|>",
               VIDEO_PAD: "<|video_pad|>", 148: "<|im_start|>", 149: "<|im_end|>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(TOKENIZER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", additional_special_tokens=list(special.values()))
    proc = Qwen2VLProcessor(image_processor=image_processor(), tokenizer=fast, video_processor=Qwen2VLVideoProcessor())
    proc.save_pretrained(str(out))
