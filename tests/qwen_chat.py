"""Tiny Qwen2-VL / Qwen2.5-VL folders as a transformers user has them, a LLaVA JSON with real images,
and transformers' own answer-only loss on it (nothing downloaded).

A folder holds what `save_pretrained` writes: the random model (tests/qwen_models.py's architectures,
vocabulary sized from the tokenizer plus rows the tokenizer never produces, as real Qwen checkpoints
have), a byte-level BPE tokenizer trained here with Qwen's special tokens (<|im_start|>,
<|im_end|>, <|vision_start|>, <|image_pad|>, <|vision_end|>, ...), Qwen's chat template (images as
`<|vision_start|><|image_pad|><|vision_end|>`, a default system prompt) with `{% generation %}`
markers around the answers, and the family's processor (Qwen2VLProcessor / Qwen2_5_VLProcessor:
Qwen2VLImageProcessor with small min/max pixels, the video processor).

The reference (`reference_losses`) never touches mmtrain: transformers' processor renders the
conversation (content as lists of text / image parts), tokenises it and expands every
<|image_pad|> to the image's merged tokens (`apply_chat_template(..., return_assistant_tokens_mask=True)`),
labels are the input ids where the assistant mask is 1 (else -100), and the model's own loss
(which shifts the labels) times the number of targets is the per-sample loss sum.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import hf_chat
import qwen_models as Q

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(7)
EXTRA_ROWS = 5  # model rows beyond the tokenizer's vocabulary
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 20
FAMILIES = Q.FAMILIES

# Qwen2-VL's template (both content forms), answers marked for return_assistant_tokens_mask
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>{% endgeneration %}\n"
    "{% elif message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "system user assistant You are a helpful assistant. You are a terse assistant.",
    "What is in the picture? A red bar on a white wall. Look at this photo and tell me the colour.",
    "The cat sat on the mat. Which one is larger, the first or the second image? Describe it in detail.",
    "Mostly blue, tall and thin. Hello there, how can I help you today? A square. The wall. The bar.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=TEMPLATE)
    assert fast.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    return fast


def make_model(family: str, vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = Q.hf_config(family)
    cfg.text_config.vocab_size = vocab
    cfg.image_token_id, cfg.video_token_id = IMAGE_PAD, VIDEO_PAD
    cfg.vision_start_token_id, cfg.vision_end_token_id = VISION_START, VISION_END
    cfg._attn_implementation = "eager"
    model = Q.model_class(family)(cfg).eval()
    return hf_chat.H.perturb(model, seed + 1, norms=("norm", "ln_q"))


def save_folder(family: str, out: Path, seed: int = 0) -> Path:
    """Model, tokenizer (with Qwen's template) and the family's processor, as transformers saves them."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = make_tokenizer()
    model = make_model(family, len(tok) + EXTRA_ROWS, seed)
    model.save_pretrained(str(out))
    ip = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=Q.PATCH, merge_size=Q.MERGE,
                               temporal_patch_size=Q.TEMPORAL)
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    proc = cls(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE)
    proc.save_pretrained(str(out))
    return out


# ---- data ------------------------------------------------------------------------------------------

# The LLaVA tests' images and records (very different sizes and aspect ratios), plus one more image
# and a record with two images in two turns, before the id-less record that stays last.
IMAGES = {**hf_chat.IMAGES, "odd.png": (157, 93, "RGB")}
RECORDS = [
    *hf_chat.RECORDS[:-1],
    {"id": "two_turns_two_images", "image": ["odd.png", "wide.png"], "conversations": hf_chat._turns(
        ("human", "<image> What is this?"), ("gpt", "A tall thing."), ("human", "And <image>?"), ("gpt", "A bar."))},
    hf_chat.RECORDS[-1],
]


def write_images(root: Path) -> None:
    for k, (name, (w, h, mode)) in enumerate(IMAGES.items()):
        im = Q.make_image(w, h, seed=k)
        im.convert(mode).save(root / name)


def write_dataset(root: Path, name: str = "data.jsonl") -> Path:
    """The LLaVA JSONL (records above; the last has no id: it is `data.jsonl:9`) and its images."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root)
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def record_ids(name: str = "data.jsonl") -> list[str]:
    return hf_chat.record_ids(name, RECORDS)


# ---- transformers' side ------------------------------------------------------------------------------

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def messages(rec: dict, root: Path) -> list[dict]:
    """The record as list-of-parts messages (what Qwen's processor takes), images as PIL objects."""
    from PIL import Image

    paths = rec.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    images = iter([Image.open(root / p) for p in paths])
    msgs = []
    for turn in rec["conversations"]:
        parts = []
        for j, piece in enumerate(turn["value"].split("<image>")):
            if j:
                parts.append({"type": "image", "image": next(images)})
            if piece:
                parts.append({"type": "text", "text": piece})
        msgs.append({"role": ROLE[turn["from"]], "content": parts})
    return msgs


def encode_reference(processor, rec: dict, root: Path) -> dict:
    out = processor.apply_chat_template(messages(rec, root), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    return dict(out)


def reference_losses(model_dir: Path, data_root: Path) -> dict[str, tuple[float, int]]:
    """record id -> (loss sum, loss targets) from transformers' model, processor and template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = {}
    for sid, rec in zip(record_ids(), RECORDS):
        enc = encode_reference(processor, rec, data_root)
        ids = enc["input_ids"][0]
        mask = torch.as_tensor(enc.pop("assistant_masks")).reshape(-1)
        labels = torch.where(mask == 1, ids, torch.full_like(ids, -100))
        with torch.no_grad():
            loss = model(**enc, labels=labels[None]).loss
        n = int((labels[1:] != -100).sum())
        out[sid] = (float(loss) * n, n)
    return out


def lengths(model_dir: Path, data_root: Path) -> dict[str, int]:
    """record id -> decoder tokens (after image expansion) of transformers' processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return {sid: int(encode_reference(processor, rec, data_root)["input_ids"].shape[1]) for sid, rec in zip(record_ids(), RECORDS)}


