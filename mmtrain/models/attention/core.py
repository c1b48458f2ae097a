"""megatron-core core-attention module that runs varlen (thd) attention from cu_seqlens.

megatron-core's local `DotProductAttention` rejects packed sequences, so this module is plugged into
the layer spec in its place. It takes GQA K/V as they come ([T, G, D]) and hands them to the chosen
backend; causal for `AttnMaskType.causal` (the decoder), bidirectional otherwise (ViT tiles).
`sliding_windows[layer_number - 1]` (megatron's global 1-based layer number) is this layer's
sliding window, None for full attention.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

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
        self._resolved: dict[tuple, str] = {}

    def backend_for(self, t: torch.Tensor) -> str:
        key = (t.device.type, t.dtype)
        if key not in self._resolved:
            self._resolved[key] = backends.resolve(self.requested_backend, t.device, t.dtype)
        return self._resolved[key]

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
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        fn = backends.BACKENDS[self.backend_for(query)]
        out = fn(query, key, value, cu, int(packed_seq_params.max_seqlen_q), self.causal, self.softmax_scale, self.sliding_window)
        return out.reshape(out.shape[0], -1)
