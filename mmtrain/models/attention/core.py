"""megatron-core core-attention module that runs varlen (thd) attention from cu_seqlens.

megatron-core's local `DotProductAttention` rejects packed sequences, so this module is plugged into
the layer spec in its place. It takes GQA K/V as they come ([T, G, D]) and hands them to the chosen
backend; causal for `AttnMaskType.causal` (the decoder), bidirectional otherwise (ViT tiles).
`sliding_windows[layer_number - 1]` (megatron's global 1-based layer number) is this layer's
sliding window, None for full attention. When the packed-sequence parameters carry rope tables
(mmtrain/models/rope.py), q and k are rotated here, over the whole stream at once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from mmtrain.models import rope
from mmtrain.models.attention import backends


class VarlenCoreAttention(MegatronModule):
    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Any = None,
        backend: str = "auto",
        sliding_windows: Optional[tuple] = None,
    ) -> None:
        super().__init__(config=config)
        self.causal = attn_mask_type == AttnMaskType.causal
        self.sliding_window = sliding_windows[layer_number - 1] if sliding_windows else None
        self.softmax_scale = softmax_scale
        self.requested_backend = backend
        self.head_dim = config.kv_channels
        self.gqa = (config.num_query_groups or config.num_attention_heads) != config.num_attention_heads
        self._resolved: dict[tuple, str] = {}

    def resolve_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend for this layer's shapes (its head dim, GQA or not) on this device and dtype."""
        key = (device.type, dtype)
        if key not in self._resolved:
            self._resolved[key] = backends.resolve(self.requested_backend, device, dtype, self.head_dim, self.gqa)
        return self._resolved[key]

    def backend_for(self, t: torch.Tensor) -> str:
        return self.resolve_backend(t.device, t.dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("VarlenCoreAttention needs packed_seq_params with qkv_format='thd'")
        tables = getattr(packed_seq_params, "rope", None)
        if tables is not None:
            fused = packed_seq_params.fused_rope
            query = rope.apply_rotary(query, tables, fused)
            key = rope.apply_rotary(key, tables, fused)
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        name = self.backend_for(query)
        max_seqlen = int(packed_seq_params.max_seqlen_q)
        if name == "reference" and query.is_cuda and max_seqlen > backends.REFERENCE_MAX_SEGMENT_ON_GPU:
            raise ValueError(
                f"model.attention_backend=reference on CUDA: a {max_seqlen}-token segment would materialise "
                f"[heads, {max_seqlen}, {max_seqlen}] fp32 scores per layer; the reference path takes segments of at "
                f"most {backends.REFERENCE_MAX_SEGMENT_ON_GPU} tokens on a GPU. Use model.attention_backend=auto "
                "(torch_varlen in bf16, sdpa in fp32)."
            )
        out = backends.BACKENDS[name](query, key, value, cu, max_seqlen, self.causal, self.softmax_scale, self.sliding_window)
        return out.reshape(out.shape[0], -1)
