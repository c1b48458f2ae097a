"""Tiny random transformers LLaVA models for the tests (nothing downloaded), and inputs for them.

Three families, every shape divisible by TP2:
  mistral_clip  Mistral text (sliding window 5) + CLIP (QuickGELU), feature layer -2, CLS dropped
  llama_siglip  Llama text (head_dim 24 != hidden/heads) + SigLIP (tanh GELU, patch bias, pooling
                head), feature layer -1, every token kept
  qwen2_clip    Qwen2 text (qkv bias, tied embeddings, odd vocab: TP pads it, one sliding layer) +
                CLIP with erf GELU, projector tanh GELU, feature layer 1
Every parameter (norms and biases included) is perturbed away from its init so that a tensor
mapped to the wrong place, or not at all, shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mistral_clip", "llama_siglip", "qwen2_clip")
IMAGE = 28  # tile side; patch 7 -> 16 patches


def hf_config(family: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config, SiglipVisionConfig

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE, patch_size=7)
    if family == "mistral_clip":
        text = MistralConfig(vocab_size=128, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 500.5}, **common)
        vision = CLIPVisionConfig(**vis)
        extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=127)
    elif family == "llama_siglip":
        text = LlamaConfig(vocab_size=120, head_dim=24, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        vision = SiglipVisionConfig(**vis)
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=5)
    elif family == "qwen2_clip":
        text = Qwen2Config(
            vocab_size=99, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common,
        )
        vision = CLIPVisionConfig(hidden_act="gelu", **vis)
        extra = dict(vision_feature_layer=1, vision_feature_select_strategy="default", image_token_index=98,
                     projector_hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    else:
        raise KeyError(family)
    return LlavaConfig(text_config=text, vision_config=vision, **extra)


def perturb(model, seed: int, norms: tuple[str, ...] = ("norm",)):
    """Random weights of order 1 on top of transformers' init (norms and biases too, which init
    leaves at 1 / 0), so that a wrong mapping shows in the logits; `norms`: name parts of norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if (any(n in name for n in norms) or name.endswith("bias")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_hf_model(family: str, seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    return perturb(model, seed + 1)


def save_hf_model(family: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """save_pretrained of a tiny random model into `out` (created)."""
    model = make_hf_model(family, seed).to(dtype)
    model.save_pretrained(str(out))
    return out


def image_token_id(model) -> int:
    return int(model.config.image_token_id)


def tokens_per_image(cfg) -> int:
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    if v.model_type == "clip_vision_model":
        n += 1
    return n - int(cfg.vision_feature_select_strategy == "default")


def make_samples(cfg, n: int, seed: int = 0, max_text: int = 24) -> list[dict]:
    """n samples: text ids (never the image id), each with 0-2 images placed anywhere in the text."""
    g = torch.Generator().manual_seed(seed)
    img_id = int(cfg.image_token_id)
    vocab = cfg.text_config.vocab_size
    per = tokens_per_image(cfg)
    out = []
    for i in range(n):
        k = int(torch.randint(3, max_text, (1,), generator=g))
        ids = torch.randint(0, vocab - 1, (k,), generator=g)
        ids[ids == img_id] = (img_id + 1) % (vocab - 1)
        images = i % 3  # 0, 1, 2 images
        parts = list(ids)
        for _ in range(images):
            at = int(torch.randint(0, len(parts) + 1, (1,), generator=g))
            parts[at:at] = [torch.tensor(img_id)] * per
        pixels = torch.randn(images, 3, IMAGE, IMAGE, generator=g)
        out.append({"input_ids": torch.stack([torch.as_tensor(t) for t in parts]).long(), "pixels": pixels})
    return out


def hf_logits(model, sample: dict) -> torch.Tensor:
    with torch.no_grad():
        kw = {"pixel_values": sample["pixels"]} if sample["pixels"].shape[0] else {}
        return model(input_ids=sample["input_ids"][None], **kw).logits[0].float()


def packed_inputs(samples: list[dict], img_id: int) -> dict:
    """One thd stream of the samples: tokens, next-token labels (0 after each sample's last token),
    position ids, cu_seqlens, images, image positions."""
    tokens = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([torch.cat([s["input_ids"][1:], torch.zeros(1, dtype=torch.long)]) for s in samples])
    pos = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])
    lens = torch.tensor([len(s["input_ids"]) for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    images = torch.cat([s["pixels"] for s in samples])
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": pos,
        "cu_seqlens": cu,
        "max_seqlen": int(lens.max()),
        "images": images,
        "image_token_index": (tokens == img_id).nonzero().flatten(),
        "spans": list(zip(cu[:-1].tolist(), cu[1:].tolist())),
    }


def hf_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' next-token cross entropy per position (all but the last), from its logits."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[:-1].gather(1, input_ids[1:, None])[:, 0]


def save_processor(out: Path, cfg) -> None:
    """A word-level tokenizer over the model's whole vocabulary ("<image>" at the image id) and a
    CLIP image processor for 28 px tiles, saved as a LlavaProcessor next to the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    img = int(cfg.image_token_id)
    vocab = {("<image>" if i == img else f"t{i}"): i for i in range(cfg.text_config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", additional_special_tokens=["<image>"])
    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=fast, patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_token="<image>",
        num_additional_image_tokens=int(cfg.vision_config.model_type == "clip_vision_model"),
    )
    proc.save_pretrained(str(out))
