"""Family-independent pieces of the transformers bridge: the config of a checkpoint folder,
memory-mapped safetensors reading by slice, the conversions between one of our full tensors and the
checkpoint tensors it is made of, and sharded safetensors writing.

A family adapter (llava.py, qwen2_vl.py) only says which checkpoint tensors make which of our
parameters (`Copy`, `QKV`, `FusedQKV`, `GateUp`) and how config.json translates; loading straight into this
rank's TP shard (each slice read from the mapped file and copied into its place in the parameter,
no intermediate full or fused tensor) and exporting full tensors are done here for every family.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from mmtrain.models.params import ShardSpec

# Files a transformers folder carries besides config and weights: tokenizer, processor, template.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


class PretrainedError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensors and the fix."""


def load_hf_config(path: Union[str, os.PathLike]):
    """transformers' config object of a local checkpoint folder (never downloads)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no config.json there (a transformers checkpoint folder is expected)")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(p), local_files_only=True)


# ---- reading ----------------------------------------------------------------------------------


class SafetensorsFolder:
    """The tensors of a checkpoint folder (`model.safetensors` or an index with shards), opened
    memory-mapped; names are normalised by the family's `normalize` (checkpoints written by
    different transformers versions spell the same tensor differently)."""

    def __init__(self, path: Union[str, os.PathLike], normalize=lambda k: k) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors files (only safetensors checkpoints are read)")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self._safe_open = safe_open
        self._handles: dict[str, object] = {}
        self.raw_names: dict[str, str] = {}  # normalised -> as written in the checkpoint
        self._file: dict[str, str] = {}
        for raw, fname in weight_map.items():
            key = normalize(raw)
            if key in self.raw_names:
                raise PretrainedError(f"{self.path}: {raw!r} and {self.raw_names[key]!r} are the same tensor ({key})")
            self.raw_names[key] = raw
            self._file[key] = fname

    def __contains__(self, key: str) -> bool:
        return key in self._file

    def keys(self) -> list[str]:
        return sorted(self._file)

    def _slice(self, key: str):
        fname = self._file[key]
        if fname not in self._handles:
            self._handles[fname] = self._safe_open(str(self.path / fname), framework="pt").__enter__()
        return self._handles[fname].get_slice(self.raw_names[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def read(self, key: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor, or only [start, stop) along `dim` (read from the mapped file, not the whole)."""
        sl = self._slice(key)
        if start is None:
            return sl[:]
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- how checkpoint tensors make one of our full tensors ----------------------------------------


@dataclass(frozen=True)
class Copy:
    """Our tensor is the checkpoint tensor itself."""

    hf: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def hf_shapes(self, full: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.hf: full}

    def load_into(self, dst: torch.Tensor, src: SafetensorsFolder, spec: ShardSpec, tp_rank: int, tp: int) -> None:
        if spec.dim is None:
            dst.copy_(src.read(self.hf))
        elif spec.vocab:  # rows [r * local, (r + 1) * local) of the zero-padded vocab
            local, real = dst.shape[0], src.shape(self.hf)[0]
            start, stop = min(tp_rank * local, real), min((tp_rank + 1) * local, real)
            dst[: stop - start].copy_(src.read(self.hf, 0, start, stop))
            dst[stop - start :].zero_()
        else:
            n = src.shape(self.hf)[spec.dim] // tp
            dst.copy_(src.read(self.hf, spec.dim, tp_rank * n, (tp_rank + 1) * n))

    def to_hf(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.hf: full}


@dataclass(frozen=True)
class QKV:
    """megatron's fused QKV, per query group [q heads of the group, k, v], from separate q/k/v."""

    q: str
    k: str
    v: str
    heads: int
    groups: int
    head_dim: int

    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def hf_shapes(self, full: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        d, rest = self.head_dim, tuple(full[1:])
        return {self.q: (self.heads * d, *rest), self.k: (self.groups * d, *rest), self.v: (self.groups * d, *rest)}

    def load_into(self, dst: torch.Tensor, src: SafetensorsFolder, spec: ShardSpec, tp_rank: int, tp: int) -> None:
        """Each q/k/v slice of this rank's groups goes straight into its rows of the fused shard."""
        g = self.groups // tp
        g0, g1 = tp_rank * g, (tp_rank + 1) * g
        per, d = self.heads // self.groups * self.head_dim, self.head_dim
        rest = dst.shape[1:]
        parts = [
            src.read(self.q, 0, g0 * per, g1 * per).view(g, per, *rest),
            src.read(self.k, 0, g0 * d, g1 * d).view(g, d, *rest),
            src.read(self.v, 0, g0 * d, g1 * d).view(g, d, *rest),
        ]
        if all(t.dtype == dst.dtype for t in parts) and dst.is_contiguous() and dst.device.type == "cpu":
            torch.cat(parts, dim=1, out=dst.view(g, per + 2 * d, *rest))
        else:
            dst.copy_(torch.cat(parts, dim=1).view(dst.shape))

    def to_hf(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        rest = full.shape[1:]
        per = self.heads // self.groups * self.head_dim
        grouped = full.reshape(self.groups, per + 2 * self.head_dim, *rest)
        q, k, v = grouped.split([per, self.head_dim, self.head_dim], dim=1)
        return {
            self.q: q.reshape(-1, *rest).contiguous(),
            self.k: k.reshape(-1, *rest).contiguous(),
            self.v: v.reshape(-1, *rest).contiguous(),
        }


@dataclass(frozen=True)
class FusedQKV:
    """megatron's fused QKV, per head [q_h, k_h, v_h], from one fused [q; k; v] tensor (no GQA:
    every head is its own group), as Qwen2-VL's ViT stores `attn.qkv`."""

    hf: str
    heads: int
    head_dim: int

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def hf_shapes(self, full: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.hf: full}

    def load_into(self, dst: torch.Tensor, src: SafetensorsFolder, spec: ShardSpec, tp_rank: int, tp: int) -> None:
        """This rank's heads of q, k and v, each read as one slice of the fused tensor."""
        n, d = self.heads // tp, self.head_dim
        h0, width = tp_rank * n, self.heads * self.head_dim
        rest = dst.shape[1:]
        parts = [src.read(self.hf, 0, j * width + h0 * d, j * width + (h0 + n) * d).view(n, 1, d, *rest) for j in range(3)]
        dst.copy_(torch.cat(parts, dim=1).view(dst.shape))

    def to_hf(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        rest = full.shape[1:]
        per_head = full.reshape(self.heads, 3, self.head_dim, *rest)
        return {self.hf: per_head.transpose(0, 1).reshape(3 * self.heads * self.head_dim, *rest).contiguous()}


@dataclass(frozen=True)
class GateUp:
    """megatron's SwiGLU fc1 [gate; up] from separate gate and up projections."""

    gate: str
    up: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def hf_shapes(self, full: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        half = (full[0] // 2, *full[1:])
        return {self.gate: half, self.up: half}

    def load_into(self, dst: torch.Tensor, src: SafetensorsFolder, spec: ShardSpec, tp_rank: int, tp: int) -> None:
        n = src.shape(self.gate)[0] // tp
        dst[:n].copy_(src.read(self.gate, 0, tp_rank * n, (tp_rank + 1) * n))
        dst[n:].copy_(src.read(self.up, 0, tp_rank * n, (tp_rank + 1) * n))

    def to_hf(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        gate, up = full.chunk(2, dim=0)
        return {self.gate: gate.contiguous(), self.up: up.contiguous()}


Recipe = Union[Copy, QKV, FusedQKV, GateUp]


# ---- names shared by the families -----------------------------------------------------------------


def rewrite_first(raw: str, rules: list[tuple[re.Pattern, str]]) -> str:
    """`raw` rewritten by the first (pattern, replacement) of `rules` that matches it (a family's
    checkpoint spellings onto ours), else unchanged."""
    for pattern, repl in rules:
        if pattern.match(raw):
            return pattern.sub(repl, raw, count=1)
    return raw


def swap_prefix(key: str, table: list[tuple[str, str]]) -> str:
    """`key` with the first matching prefix of `table` replaced (our spelling -> the saved one)."""
    for prefix, repl in table:
        if key.startswith(prefix):
            return repl + key[len(prefix) :]
    return key


_DECODER_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def text_decoder_recipe(name: str, cfg, lm: str) -> Optional[Recipe]:
    """The checkpoint tensors of our decoder parameter `name` for a Llama / Mistral / Qwen2 text
    model whose modules sit under `lm` (embedding, output layer, final norm, layers: q/k/v into our
    fused qkv, gate/up into fc1); None for a name outside the decoder or without a tensor."""
    from mmtrain.models.config import head_dim

    fixed = {
        "language_model.embedding.word_embeddings.weight": lm + "embed_tokens.weight",
        "language_model.output_layer.weight": "lm_head.weight",
        "language_model.decoder.final_layernorm.weight": lm + "norm.weight",
    }
    if name in fixed:
        return Copy(fixed[name])
    m = _DECODER_LAYER.match(name)
    if not m:
        return None
    d, (i, rest) = cfg.decoder, m.groups()
    p = f"{lm}layers.{i}."
    if rest.startswith("self_attention.linear_qkv."):
        leaf, a = rest.rsplit(".", 1)[1], p + "self_attn."
        return QKV(a + f"q_proj.{leaf}", a + f"k_proj.{leaf}", a + f"v_proj.{leaf}", d.num_attention_heads,
                   d.num_query_groups, head_dim(cfg))
    if rest == "mlp.linear_fc1.weight":
        return GateUp(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
    layer = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }
    return Copy(p + layer[rest]) if rest in layer else None


def read_shard(recipe: Recipe, src: SafetensorsFolder, spec: ShardSpec, tp_rank: int, tp: int, shape) -> torch.Tensor:
    """This TP rank's shard (of the given local shape) as a new tensor."""
    out = torch.empty(shape, dtype=torch_dtype(src.dtype(recipe.hf_names()[0])))
    recipe.load_into(out, src, spec, tp_rank, tp)
    return out


# ---- writing ----------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use fp32, bf16 or fp16")
    return _DTYPES[name]


def write_safetensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index when over one shard).

    Tensors are consumed one at a time; at most one shard's worth is held in memory.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a previous export's shards must not mix with these
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    tmp_files: list[Path] = []

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            f = out / f".shard-{len(tmp_files):05d}.safetensors"
            save_file(shards[-1], str(f), metadata={"format": "pt"})
            tmp_files.append(f)
            shards[-1] = {}
        size = 0

    names: dict[str, int] = {}
    total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        names[name] = len(tmp_files)
        size += nbytes
        total += nbytes
    flush()
    n = len(tmp_files)
    if n == 1:
        final = [out / "model.safetensors"]
    else:
        final = [out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for src, dst in zip(tmp_files, final):
        os.replace(src, dst)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i].name for k, i in sorted(names.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [f.name for f in final]


def copy_side_files(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer, processor, chat template and generation config files of `src`."""
    copied = []
    for name in SIDE_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, out / name)
            copied.append(name)
    return copied
