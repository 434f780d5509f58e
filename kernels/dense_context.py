"""Launcher for tq_dequant.py: decode the cached context of a step's long prompt chunks once into
dense K/V, for FlashAttention (the backend calls it); the oracle is `vllm_turboquant.codec.
context_kv` (see reference.py beside this file).

Why: the paged kernel serves a chunk's queries in 16-token tiles and each tile decodes the whole
context again; at 32k tokens that made prefill 5.7x bf16's. Decoding once costs one read of the
packed pages and one write and read of bf16 K/V, small next to the attention itself.

No host synchronisation: the launch is sized by host upper bounds (ContextSpan) and the exact
lengths stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_turboquant.codec import LayerKVCodec, RecentTokens

from . import to_device_async, tq_dequant
from .launch import launch, shared_memory_limit
from .paged_attention import AttentionConstants, page_constants

BLOCK_N = 64  # positions per program
# The per-head [d, d] matrices of one tl.dot need 160 KB of shared memory at head_dim 256 (sm_89
# build); GPUs with less per program than this (Ada, consumer Blackwell: 99 KB) take the
# matrices in two column blocks (tq_dequant.OUT_SPLIT).
FULL_MATRIX_MIN_SHARED = 160 << 10


@dataclass
class ContextSpan:
    """The cached positions one dense read decodes: [starts[i], starts[i] + n_i) of each sequence
    i, packed in sequence order (row offsets cu_keys, BLOCK_N-position tiles cu_tiles; device
    int32). Host upper bounds size the output and the grid: num_keys (rows), max_keys (the
    longest sequence's keys, FlashAttention's max_seqlen_k), max_tiles."""
    starts: torch.Tensor    # [num_seqs]
    cu_keys: torch.Tensor   # [num_seqs + 1]
    cu_tiles: torch.Tensor  # [num_seqs + 1]
    num_keys: int
    max_keys: int
    max_tiles: int


def context_span(starts: torch.Tensor, ends: torch.Tensor, device: torch.device,
                 limit: torch.Tensor | None = None) -> ContextSpan:
    """Positions [starts[i], ends[i]) (host int tensors [num_seqs]) of each sequence, ends clipped
    on the device to limit[i] (device [num_seqs]: where each cached context really ends, for
    host lengths that are only upper bounds)."""
    n_host = (ends - starts).clamp(min=0)
    s = to_device_async(starts.to(torch.int32), device)
    e = to_device_async(ends.to(torch.int32), device)
    if limit is not None:
        e = torch.minimum(e, limit.to(torch.int32))
    n = (e - s).clamp(min=0)
    cu_keys = torch.zeros(n.shape[0] + 1, dtype=torch.int32, device=device)
    cu_tiles = torch.zeros_like(cu_keys)
    torch.cumsum(n, 0, out=cu_keys[1:])
    torch.cumsum((n + BLOCK_N - 1) // BLOCK_N, 0, out=cu_tiles[1:])
    return ContextSpan(s, cu_keys, cu_tiles, num_keys=int(n_host.sum()),
                       max_keys=int(n_host.max()) if n_host.numel() else 0,
                       max_tiles=int(((n_host + BLOCK_N - 1) // BLOCK_N).sum()))


def dequantize_context(codec: LayerKVCodec, cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, span: ContextSpan, num_q_heads: int,
                       dtype: torch.dtype, recent: RecentTokens | None = None,
                       num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [span.num_keys, H, d] in `dtype`, original channel order, means added:
    rows cu_keys[i]:cu_keys[i+1] are sequence i's positions from starts[i] on (rows past
    cu_keys[-1] are left unwritten). seq_lens [num_seqs] (device) place the exact copies."""
    lay = codec.layout
    c = AttentionConstants.of(codec, num_q_heads, cache.device)
    shape = (span.num_keys, lay.num_kv_heads, lay.head_dim)
    k = torch.empty(shape, dtype=dtype, device=cache.device)
    v = torch.empty(shape, dtype=dtype, device=cache.device)
    if span.max_tiles == 0:
        return k, v
    st = (recent.key, recent.value, recent.tag, recent.ring_of_row) if recent is not None \
        else (cache,) * 4
    launch(
        tq_dequant.tq_dequant_kernel, (span.max_tiles, lay.num_kv_heads),
        cache, block_table, seq_lens, span.starts, span.cu_keys, span.cu_tiles, c.codebooks,
        c.tables, c.k_back, c.qjl_back, c.r_back, c.key_mean_kv, c.value_mean, k, v, *st,
        block_table.stride(0), lay.page_bytes, lay.head_stride, seq_lens.shape[0],
        recent.ring_of_row.shape[0] if recent is not None else 0,
        recent.window if recent is not None else 1,
        BLOCK_N=BLOCK_N, OUT_SPLIT=out_split(lay.head_dim, cache.device),
        **page_constants(codec, c, cache.device, recent), num_warps=num_warps)
    return k, v


def out_split(head_dim: int, device: torch.device) -> int:
    """Column blocks the dense read takes its back-rotation in (tq_dequant.OUT_SPLIT)."""
    return 1 if head_dim <= 128 or shared_memory_limit(device) >= FULL_MATRIX_MIN_SHARED else 2
