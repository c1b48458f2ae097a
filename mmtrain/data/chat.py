"""Conversations -> token ids and loss targets, with the model's own tokenizer and chat template.

Why transformers' machinery and not ours: the ids a model was trained on are those of its tokenizer
and template, so mmtrain renders with transformers' template renderer, tokenises with the model's
tokenizer and follows the processor's rule for special tokens; the token stream and the answer mask
are then transformers' by construction (tests/integration/test_hf_text.py compares them with
`processor.apply_chat_template(..., return_assistant_tokens_mask=True)`).

* A LLaVA record's turns (`from: human|gpt|system`, `value` with `<image>` placeholders) become
  messages (`role: user|assistant|system`). The template decides whether a message's content is a
  string or a list of parts (`[{"type": "text", ...}, {"type": "image"}]`, what llava-hf templates
  iterate over): both are probed once and the form the template renders is used; a string is split
  at its `<image>` placeholders in place, text kept verbatim.
* Loss targets: the assistant spans the template marks with `{% generation %}`; templates without
  markers get the spans from rendering prefixes (the conversation up to each answer with the
  generation prompt, then with the answer). `data.loss_on=all` makes every text token a target.
* Special tokens: what the template renders. Under a processor, the tokenizer's own BOS/EOS are
  added unless the rendering already starts with BOS (processor.apply_chat_template's rule); a bare
  tokenizer adds none (tokenizer.apply_chat_template's rule).
* With no tokenizer (`data.tokenizer=bytes`, the default without model.pretrained) a byte-level
  tokenizer stands in: id = UTF-8 byte value (a vocabulary of 256), so small from-scratch models
  train on real text without any files.

Image placeholders stay one token each here; their expansion to image tokens is the image
processor's business (mmtrain/data/images.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LOSS_ON = ("assistant", "all")
_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Built-in templates (data.chat_template=NAME) for tokenizers that ship none; all mark the answers.
TEMPLATES = {
    # role-prefixed lines; the byte tokenizer's default
    "plain": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ m['content'] + '\n' }}{% endgeneration %}"
        "{% endif %}{% endfor %}"
    ),
    # LLaVA-1.5's conversation format (vicuna v1): system, then ' USER: q ASSISTANT: a</s>'
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = 'A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human\\'s questions.' %}{% set turns = messages %}"
        "{% endif %}{{ system }}"
        "{% for m in turns %}{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
        "{% else %}{{ ' ASSISTANT: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    ),
}


class RecordError(ValueError):
    """A record that cannot become a conversation; the message says what is wrong with it."""


class TemplateError(ValueError):
    """The tokenizer / chat template cannot encode conversations as mmtrain needs them."""


def _kind(x: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(x), type(x).__name__)


def record_images(rec: dict) -> list[str]:
    """The record's image paths (`image`: a path or a list of paths; absent or empty: none)."""
    image = rec.get("image", rec.get("images"))
    if image is None or image == "" or image == []:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) and p for p in image):
        return list(image)
    raise RecordError(f"`image` is {_kind(image)}, not a path or a list of paths")


def record_messages(rec: Any) -> list[dict]:
    """A LLaVA record's conversation as chat messages (role, content string); raises RecordError.

    Turns are `{"from": human|gpt|system, "value": str}` (or `role` / `content`); a top-level string
    `system` becomes a leading system message."""
    if not isinstance(rec, dict):
        raise RecordError(f"the record is {_kind(rec)}, not an object")
    if "conversations" not in rec:
        raise RecordError("it has no `conversations`")
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise RecordError(f"`conversations` is {_kind(conv)}, not a list")
    if not conv:
        raise RecordError("`conversations` is empty")
    msgs = []
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RecordError(f"`system` is {_kind(system)}, not a string")
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} is {_kind(turn)}, not an object")
        who = turn.get("from", turn.get("role"))
        if who is None:
            raise RecordError(f"turn {i} has no `from`")
        if who not in ROLES:
            raise RecordError(f"turn {i}: `from` is {who!r} (expected human, gpt or system)")
        value = turn.get("value", turn.get("content"))
        if value is None:
            raise RecordError(f"turn {i} has no `value`")
        if not isinstance(value, str):
            raise RecordError(f"turn {i}: `value` is {_kind(value)}, not a string")
        msgs.append({"role": ROLES[who], "content": value})
    return msgs


def check_placeholders(msgs: list[dict], images: int) -> None:
    n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    if n != images:
        what = f"{images} image{'s' if images != 1 else ''}"
        raise RecordError(f"{n} `<image>` placeholder{'s' if n != 1 else ''} for {what}")


def to_parts(content: str) -> list[dict]:
    """'a <image> b' -> [text 'a ', image, text ' b'] (text verbatim, empty pieces left out)."""
    parts: list[dict] = []
    for k, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


@dataclass
class Encoded:
    """One conversation as tokens (each image still a single placeholder token)."""

    ids: np.ndarray  # int64 [n]
    targets: np.ndarray  # bool [n]: the token is a loss target (predicted from the one before it)
    answers: np.ndarray  # int64 [k, 2]: token [start, end) of each assistant turn, in order
    placeholders: np.ndarray  # int64 [images]: index in `ids` of each image placeholder


def _render(conversation, template: str, *, generation: bool, add_generation_prompt: bool = False, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    text, spans = render_jinja_template(
        conversations=[conversation], chat_template=template, return_assistant_tokens_mask=generation,
        add_generation_prompt=add_generation_prompt, **kwargs,
    )
    return text[0], (spans[0] if generation else [])


class ChatEncoder:
    """Messages -> Encoded, for one tokenizer, template and loss setting."""

    def __init__(self, tokenizer, template: str, *, image_token: str = IMAGE_PLACEHOLDER, processor_rule: bool = False,
                 loss_on: str = "assistant", name: str = "") -> None:
        if loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on={loss_on!r}: choose assistant or all")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError(f"tokenizer {name}: a fast (tokenizers-backed) tokenizer is needed for token offsets")
        self.tok = tokenizer
        self.template = template
        self.name = name
        self.loss_on = loss_on
        self.processor_rule = processor_rule
        self.image_token = image_token
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise TemplateError(
                f"tokenizer {name}: {image_token!r} is {len(ids)} tokens; the image placeholder must be one "
                "(special) token of the vocabulary"
            )
        self.image_id = int(ids[0])
        self.has_markers = bool(_MARKER.search(template))
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.form = self._content_form()

    # ---- the template ---------------------------------------------------------------------------
    def render(self, msgs: list[dict], *, generation: bool = False, add_generation_prompt: bool = False):
        return _render(msgs, self.template, generation=generation, add_generation_prompt=add_generation_prompt, **self._kwargs)

    def _content_form(self) -> str:
        """'string' or 'parts': the message content form this template renders (probed once). A
        template that renders both takes parts when its image parts render differently from the bare
        image token (Qwen's <|vision_start|><|image_pad|><|vision_end|>): that markup is the
        model's image format, what transformers' processor renders for image parts."""
        probe = [{"role": "user", "content": f"mmq0 {IMAGE_PLACEHOLDER} mmq1"}, {"role": "assistant", "content": "mma0"}]
        tried, rendered = [], {}
        for form in ("string", "parts"):
            msgs = self._in_form(probe, form)
            try:
                text, _ = self.render(msgs)
            except Exception as e:  # noqa: BLE001 - a template may raise on the form it does not take
                tried.append(f"{form}: {type(e).__name__}: {e}")
                continue
            if all(w in text for w in ("mmq0", "mmq1", "mma0")) and text.count(self.image_token) == 1 and "'type'" not in text:
                rendered[form] = text
            else:
                tried.append(f"{form}: rendered {text[:200]!r}")
        if "string" in rendered and "parts" in rendered:
            return "parts" if rendered["parts"] != rendered["string"] else "string"
        if rendered:
            return next(iter(rendered))
        raise TemplateError(
            f"chat template {self.name}: renders neither string contents (with {self.image_token} inside) nor "
            f"lists of text/image parts; probes gave: {'; '.join(tried)}"
        )

    def _in_form(self, msgs: list[dict], form: str) -> list[dict]:
        if form == "string":
            if self.image_token == IMAGE_PLACEHOLDER:
                return msgs
            return [dict(m, content=m["content"].replace(IMAGE_PLACEHOLDER, self.image_token)) for m in msgs]
        return [dict(m, content=to_parts(m["content"])) for m in msgs]

    def messages_for_template(self, msgs: list[dict]) -> list[dict]:
        """LLaVA messages (`<image>` in the text) in the form the template renders: strings with the
        tokenizer's image token in place of `<image>`, or lists of text / image parts."""
        return self._in_form(msgs, self.form)

    def _answer_chars(self, msgs: list[dict], text: str) -> list[tuple[int, int]]:
        """Char spans of the assistant turns for templates without generation markers, from prefixes."""
        spans = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, _ = self.render(msgs[:k], add_generation_prompt=True) if k else ("", [])
            upto, _ = self.render(msgs[: k + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise TemplateError(
                    f"chat template {self.name} has no {{% generation %}} markers and renders a conversation's "
                    "prefixes differently from the conversation, so the answers cannot be located; use a template "
                    "with markers (data.chat_template=NAME|FILE.jinja)"
                )
            spans.append((len(before), len(upto)))
        return spans

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> Encoded:
        msgs = self.messages_for_template(messages)
        try:
            text, spans = self.render(msgs, generation=self.has_markers)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja raise_exception() and friends
            raise RecordError(f"the chat template refused it ({type(e).__name__}: {e})") from e
        if not self.has_markers:
            spans = self._answer_chars(msgs, text)
        bos = self.tok.bos_token
        add = self.processor_rule and not (bos is not None and text.startswith(bos))
        enc = self.tok(text, add_special_tokens=add, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=bool)
        answers = []
        # A token belongs to an answer when its characters overlap the answer's (transformers' rule).
        for a, b in spans:
            hit = np.flatnonzero((offsets[:, 1] > a) & (offsets[:, 0] < b))
            if len(hit):
                mask[hit] = True
                answers.append((int(hit[0]), int(hit[-1]) + 1))
        placeholders = np.flatnonzero(ids == self.image_id)
        if self.loss_on == "all":
            targets = np.ones(len(ids), dtype=bool)
        else:
            targets = mask
        targets[placeholders] = False
        return Encoded(ids=ids, targets=targets, answers=np.asarray(answers, dtype=np.int64).reshape(-1, 2),
                       placeholders=placeholders.astype(np.int64))


# ---- loading --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, as byte-level BPE vocabularies spell bytes: printable Latin-1
    bytes stand for themselves, the others take characters from 256 upwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def byte_tokenizer():
    """A fast tokenizer whose ids are the UTF-8 bytes of the text (0..255), `<image>` special (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=[IMAGE_PLACEHOLDER])
    return fast


def _read_template(spec: str, tokenizer) -> tuple[str, str]:
    """(template text, where it came from) for data.chat_template: a built-in name, a file, or the
    name of one of the tokenizer's named templates."""
    if spec in TEMPLATES:
        return TEMPLATES[spec], f"built-in {spec!r}"
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read(), spec
    named = getattr(tokenizer, "chat_template", None)
    if isinstance(named, dict) and spec in named:
        return named[spec], f"the tokenizer's {spec!r}"
    choices = sorted(TEMPLATES) + (sorted(named) if isinstance(named, dict) else [])
    raise TemplateError(f"data.chat_template={spec!r}: not a file nor a template name ({', '.join(choices)})")


def _default_template(processor, tokenizer) -> Optional[str]:
    for owner in (processor, tokenizer):
        t = getattr(owner, "chat_template", None) if owner is not None else None
        if isinstance(t, dict):
            t = t.get("default")
        if t:
            return t
    return None


@lru_cache(maxsize=8)
def load_processor(path: str):
    """transformers' processor of a model folder (local files only), or None if it has none."""
    if not os.path.isdir(path):
        return None
    names = ("processor_config.json", "preprocessor_config.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


@lru_cache(maxsize=8)
def load_tokenizer(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist (only local tokenizers are used)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(path):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenizer_path(data_cfg, model_cfg) -> str:
    """data.tokenizer, else model.pretrained (the model's own), else the byte-level tokenizer."""
    return data_cfg.tokenizer or model_cfg.pretrained or "bytes"


def build_encoder(data_cfg, model_cfg) -> ChatEncoder:
    """The chat encoder training and evaluation use for `data` with `model`."""
    path = tokenizer_path(data_cfg, model_cfg)
    if path == "bytes":
        if model_cfg.decoder.vocab_size < 256:
            raise TemplateError(
                f"the byte-level tokenizer needs model.decoder.vocab_size >= 256 (got {model_cfg.decoder.vocab_size}); "
                "set data.tokenizer=<tokenizer folder>"
            )
        tok, processor = byte_tokenizer(), None
    else:
        processor = load_processor(path)
        if getattr(processor, "tokenizer", None) is None:  # none, or only an image processor
            processor = None
        tok = processor.tokenizer if processor is not None else load_tokenizer(path)
    if data_cfg.chat_template:
        template, where = _read_template(data_cfg.chat_template, tok)
    elif path == "bytes":
        template, where = TEMPLATES["plain"], "built-in 'plain'"
    else:
        template, where = _default_template(processor, tok), f"{path}'s"
        if template is None:
            raise TemplateError(
                f"the tokenizer at {path} has no chat template; set data.chat_template="
                f"{'|'.join(sorted(TEMPLATES))} or a .jinja file"
            )
    image_token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None) or IMAGE_PLACEHOLDER
    return ChatEncoder(tok, template, image_token=image_token, processor_rule=processor is not None,
                       loss_on=data_cfg.loss_on, name=f"{where} template with tokenizer {path}")
