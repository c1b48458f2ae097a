"""Tiny LLaVA folders with a real tokenizer, chat template and processor, a LLaVA JSON with real
images, and transformers' own answer-only loss on it (nothing downloaded).

A folder holds what `save_pretrained` writes for a transformers LLaVA user: the random model
(tests/hf_models.py, vocabulary resized to the tokenizer's), a byte-level BPE tokenizer trained
here with `tokenizers` (special tokens <pad> <s> </s> <image>), a chat template with
`{% generation %}` markers, and a LlavaProcessor (CLIP or SigLIP image processor) saved beside it.

  mistral_clip  string contents (`<image>` inside the text), the template renders BOS
  llama_siglip  list-of-parts contents (llava-hf style), BOS added by the tokenizer's
                post-processor (the processor's rule), SigLIP resize without crop
  qwen2_clip    chatml-like string template, no BOS, tied embeddings, odd vocabulary (TP pads it)

The reference (`reference_losses`) never touches mmtrain: transformers' processor renders,
tokenises and expands each conversation (`apply_chat_template(..., return_assistant_tokens_mask=True)`),
labels are the input ids where the assistant mask is 1 (else -100), and the model's own loss,
times the number of targets, is the per-sample loss sum.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import hf_models as H

SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
IMAGE_ID = 3

STRING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
)
PARTS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{{ eos_token }}{% endgeneration %}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\n' }}{% endfor %}"
)
# llava-hf's own layout: every message's images first, then its text pieces each followed by a space
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)
FOLDERS = {  # family -> (template, content form, BOS by post-processor, extra model vocab rows)
    "mistral_clip": (STRING_TEMPLATE, "string", False, 0),
    "llama_siglip": (PARTS_TEMPLATE, "parts", True, 0),
    "qwen2_clip": (CHATML_TEMPLATE, "string", False, 3),
}
CORPUS = [
    "USER: ASSISTANT: SYSTEM: <|im_start|>user <|im_start|>assistant <|im_end|>",
    "What is in the picture? A red bar on a white wall. Look at this photo and tell me the colour.",
    "The cat sat on the mat. Which one is larger, the first or the second image? Describe it in detail.",
    "You are a terse assistant. Mostly blue, tall and thin. Hello there, how can I help you today?",
]


def make_tokenizer(template: str, bos_post_processor: bool, vocab_size: int = 300, image_token: str = "<image>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [image_token if t == "<image>" else t for t in SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 8, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": image_token}, chat_template=template)
    assert fast.convert_tokens_to_ids(image_token) == IMAGE_ID
    return fast


def make_model(family: str, vocab: int, seed: int):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = H.hf_config(family)
    cfg.text_config.vocab_size = vocab
    cfg.image_token_id = IMAGE_ID
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    return H.perturb(model, seed + 1)


def save_folder(family: str, out: Path, seed: int = 0) -> Path:
    """Model, tokenizer (with its chat template) and LlavaProcessor, saved as transformers saves them."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    template, _, bos_pp, extra = FOLDERS[family]
    tok = make_tokenizer(template, bos_pp)
    model = make_model(family, len(tok) + extra, seed)
    model.save_pretrained(str(out))
    cfg = model.config
    if cfg.vision_config.model_type == "clip_vision_model":
        ip = CLIPImageProcessor(size={"shortest_edge": H.IMAGE}, crop_size={"height": H.IMAGE, "width": H.IMAGE})
    else:
        ip = SiglipImageProcessor(size={"height": H.IMAGE, "width": H.IMAGE})
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=cfg.vision_config.patch_size, chat_template=template,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_token="<image>",
        num_additional_image_tokens=int(cfg.vision_config.model_type == "clip_vision_model"),
    )
    proc.save_pretrained(str(out))
    return out


# ---- data ------------------------------------------------------------------------------------------

IMAGES = {  # name -> (width, height, mode): very different shapes
    "wide.png": (300, 40, "RGB"), "tall.png": (24, 260, "RGB"), "big.jpg": (512, 384, "RGB"),
    "tiny.png": (5, 9, "RGB"), "gray.png": (100, 60, "L"), "square.jpg": (64, 64, "RGB"),
}


def _turns(*pairs):
    return [{"from": w, "value": v} for w, v in pairs]


RECORDS = [
    {"id": "first", "image": "wide.png", "conversations": _turns(("human", "<image>\nWhat is in the picture?"), ("gpt", "A red bar on a white wall."))},
    {"id": "middle", "image": "tall.png", "conversations": _turns(
        ("human", "Look at this photo: <image> Which colour?"), ("gpt", "Mostly blue."),
        ("human", "And the shape?"), ("gpt", "Tall and thin."))},
    {"id": "text_only", "conversations": _turns(("human", "Tell me a fact."), ("gpt", "The cat sat on the mat."))},
    {"id": "two_images", "image": ["tiny.png", "gray.png"], "conversations": _turns(
        ("human", "Which one is larger, <image> or <image>?"), ("gpt", "The second image."))},
    {"id": "system", "image": "big.jpg", "conversations": _turns(
        ("system", "You are a terse assistant."), ("human", "Describe it in detail.\n<image>"), ("gpt", "A photo."))},
    {"id": "second_turn", "image": "square.jpg", "conversations": _turns(
        ("human", "Hello there"), ("gpt", "How can I help you today?"),
        ("human", "Describe <image> please"), ("gpt", "A square."))},
    {"id": "text_multi", "conversations": _turns(
        ("human", "What is blue?"), ("gpt", "The wall."), ("human", "And red?"), ("gpt", "The bar."))},
    {"conversations": _turns(("human", "<image> What is this?"), ("gpt", "A tall thing.")), "image": "tall.png"},
]


def write_images(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, (w, h, mode) in IMAGES.items():
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        im.save(root / name)


def write_dataset(root: Path, name: str = "data.jsonl") -> Path:
    """The LLaVA JSONL (records above; the last has no id: it is `data.jsonl:8`) and its images."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root)
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def assert_scores(rows, ref: dict, ids: list[str], where: str, rel: float, atol: float) -> None:
    """Per-sample eval rows [id, loss sum, loss tokens] against transformers' (`ref`: id -> (sum,
    tokens)): every record once, in order; the same targets; the same loss sum within rel / atol."""
    assert [r[0] for r in rows] == ids, f"{where}: not every record once, in order"
    for sid, loss_sum, tokens in rows:
        ref_sum, ref_tokens = ref[sid]
        assert tokens == ref_tokens, f"{where} {sid}: {tokens} loss targets, transformers has {ref_tokens}"
        assert abs(loss_sum - ref_sum) <= rel * abs(ref_sum) + atol, f"{where} {sid}: loss sum {loss_sum} vs transformers {ref_sum}"


def record_ids(name: str = "data.jsonl", records: list[dict] | None = None) -> list[str]:
    """Each record's id; a record without one is named by its line (`data.jsonl:8`)."""
    return [r.get("id", f"{name}:{i + 1}") for i, r in enumerate(RECORDS if records is None else records)]


# ---- transformers' side ------------------------------------------------------------------------------

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def messages(rec: dict, form: str, root: Path) -> tuple[list[dict], list]:
    """The record as the template consumes it, and its images (PIL) in order."""
    from PIL import Image

    paths = rec.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    images = [Image.open(root / p) for p in paths]
    msgs, k = [], 0
    for turn in rec["conversations"]:
        text = turn["value"]
        if form == "string":
            msgs.append({"role": ROLE[turn["from"]], "content": text})
            continue
        parts = []
        for j, piece in enumerate(text.split("<image>")):
            if j:
                parts.append({"type": "image", "image": images[k]})
                k += 1
            if piece:
                parts.append({"type": "text", "text": piece})
        msgs.append({"role": ROLE[turn["from"]], "content": parts})
    return msgs, images


def encode_reference(processor, rec: dict, form: str, root: Path, chat_template: str | None = None) -> dict:
    msgs, images = messages(rec, form, root)
    kw = {"processor_kwargs": {"images": images}} if (form == "string" and images) else {}
    if chat_template is not None:
        kw["chat_template"] = chat_template
    out = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt", **kw)
    ids = out["input_ids"][0]
    mask = torch.as_tensor(out["assistant_masks"]).reshape(-1)
    return {"input_ids": ids, "assistant_mask": mask, "pixel_values": out.get("pixel_values")}


def reference_losses(model_dir: Path, data_root: Path, form: str) -> dict[str, tuple[float, int]]:
    """record id -> (loss sum, loss targets) from transformers' model, processor and template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = {}
    for sid, rec in zip(record_ids(), RECORDS):
        enc = encode_reference(processor, rec, form, data_root)
        ids = enc["input_ids"]
        labels = torch.where(enc["assistant_mask"] == 1, ids, torch.full_like(ids, -100))
        kw = {"pixel_values": enc["pixel_values"]} if enc["pixel_values"] is not None else {}
        with torch.no_grad():
            loss = model(input_ids=ids[None], labels=labels[None], **kw).loss
        n = int((labels[1:] != -100).sum())
        out[sid] = (float(loss) * n, n)
    return out
