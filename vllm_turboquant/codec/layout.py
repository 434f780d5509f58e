"""Byte layout of one paged-KV-cache page (one block of `block_size` tokens, all KV heads).

    page  = [head 0][head 1]...[head H-1]                  head stride = block_size · slot_bytes
    head  = [region 0][region 1]...                        every region is [block_size, row_bytes]
    K regions: codes_o, codes_r (bit planes, see packing.py), signs (prod only),
               gamma_o, gamma_r, rnorm (prod only)          (fp16 norms, one per token)
    V regions: codes_o, codes_r, gamma_o, gamma_r

Each region is token-major and contiguous, so a kernel loads a [BLOCK_N, row_bytes] tile with one
2-D masked load. With block_size a multiple of 16 every region and head starts 16-byte aligned.
The page size is a pure function of (format, head_dim, block_size, num_kv_heads):
    page_bytes = num_kv_heads · block_size · format.bytes_per_token_head(head_dim)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .formats import NORM_BYTES, KVFormat, TensorFormat, get_format, split_sizes

BLOCK_SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class Region:
    name: str       # e.g. "k.codes_o"
    offset: int     # bytes from the start of the head's part of the page
    row_bytes: int  # bytes per token


def _tensor_regions(prefix: str, fmt: TensorFormat, head_dim: int) -> list[tuple[str, int]]:
    n_o, n_r = split_sizes(head_dim)
    rows = [(f"{prefix}.codes_o", fmt.outlier_bits * n_o // 8),
            (f"{prefix}.codes_r", fmt.regular_bits * n_r // 8)]
    if fmt.has_qjl:
        rows.append((f"{prefix}.signs", head_dim // 8))
    rows += [(f"{prefix}.gamma_o", NORM_BYTES), (f"{prefix}.gamma_r", NORM_BYTES)]
    if fmt.has_qjl:
        rows.append((f"{prefix}.rnorm", NORM_BYTES))
    return rows


@dataclass(frozen=True)
class PageLayout:
    format: KVFormat
    head_dim: int
    block_size: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.block_size % BLOCK_SIZE_MULTIPLE:
            raise ValueError(
                f"TurboQuant pages need block_size to be a multiple of {BLOCK_SIZE_MULTIPLE}, "
                f"got {self.block_size}; pass --block-size 16 (or 32, 64, ...)."
            )
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be >= 1, got {self.num_kv_heads}")

    @functools.cached_property
    def regions(self) -> dict[str, Region]:
        rows = (_tensor_regions("k", self.format.key, self.head_dim)
                + _tensor_regions("v", self.format.value, self.head_dim))
        out, offset = {}, 0
        for name, row in rows:
            out[name] = Region(name, offset, row)
            offset += row * self.block_size
        return out

    @property
    def slot_bytes(self) -> int:
        """Bytes per token per KV head (K and V): the `tq_slot_size` vLLM sizes pages with."""
        return self.format.bytes_per_token_head(self.head_dim)

    @property
    def head_stride(self) -> int:
        return self.block_size * self.slot_bytes

    @property
    def page_bytes(self) -> int:
        return self.num_kv_heads * self.head_stride


def page_layout(format_name: str, head_dim: int, block_size: int, num_kv_heads: int) -> PageLayout:
    return PageLayout(get_format(format_name), head_dim, block_size, num_kv_heads)
