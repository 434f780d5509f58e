"""KV-cache specs that size pages by TurboQuant's packed bytes."""
from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class TQSlidingWindowSpec(SlidingWindowSpec):
    """SlidingWindowSpec whose page holds `tq_slot_size` bytes per token and KV head (the sliding
    counterpart of vLLM's TQFullAttentionSpec)."""

    tq_slot_size: int = 0

    @property
    def real_page_size_bytes(self) -> int:
        return self.block_size * self.num_kv_heads * self.tq_slot_size
