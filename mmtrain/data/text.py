"""Text-token counting: a Hugging Face tokenizer from a local path, or a built-in byte-level default.

Why: the analysis must run offline and without optional packages. The default counts UTF-8 bytes
(one token per byte, as a byte-level model without merges would), which is an upper bound on any
byte-level BPE; pass `--tokenizer PATH` (a folder with tokenizer.json, or a tokenizer.json file)
for real counts. `tokenizers` / `transformers` are imported only when such a path is given.

Each `<image>` placeholder counts as exactly one token whatever the tokenizer does with the
string, because the model registers it as a single special token.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

IMAGE_PLACEHOLDER = "<image>"


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class ByteTokenizer:
    """One token per UTF-8 byte; needs nothing."""

    name = "bytes"

    def count(self, text: str) -> int:
        return len(text.encode("utf-8"))


class _CallableTokenizer:
    def __init__(self, name: str, fn: Callable[[str], int]) -> None:
        self.name = name
        self._fn = fn

    def count(self, text: str) -> int:
        return self._fn(text) if text else 0


def load_tokenizer(path: str | None) -> TokenCounter:
    """The byte default for None/'bytes'; otherwise a local Hugging Face tokenizer (no downloads)."""
    if path in (None, "", "bytes"):
        return ByteTokenizer()
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist (only local tokenizers are supported)")
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    try:
        from tokenizers import Tokenizer  # type: ignore[import-not-found]
    except ImportError:
        Tokenizer = None  # noqa: N806
    if Tokenizer is not None and os.path.isfile(file):
        tok = Tokenizer.from_file(file)
        return _CallableTokenizer(file, lambda s: len(tok.encode(s, add_special_tokens=False).ids))
    try:
        from transformers import AutoTokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"--tokenizer {path}: install `tokenizers` (for tokenizer.json) or `transformers` to use it"
        ) from None
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _CallableTokenizer(path, lambda s: len(hf.encode(s, add_special_tokens=False)))


def count_text(tok: TokenCounter, text: str) -> tuple[int, int]:
    """(text tokens including placeholders, number of `<image>` placeholders) of one string."""
    parts = text.split(IMAGE_PLACEHOLDER)
    placeholders = len(parts) - 1
    return sum(tok.count(p) for p in parts if p) + placeholders, placeholders


def count_conversation(tok: TokenCounter, turns: list) -> tuple[int, int]:
    """Sum of `count_text` over the `value` of each turn (no chat template is applied)."""
    tokens = placeholders = 0
    for turn in turns:
        value = turn.get("value", "") if isinstance(turn, dict) else ""
        if not isinstance(value, str):
            value = str(value)
        t, p = count_text(tok, value)
        tokens += t
        placeholders += p
    return tokens, placeholders
