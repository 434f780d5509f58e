"""Exact copies of each running sequence's newest tokens, beside the compressed pages.

Quantization error hurts most where attention looks hardest: the last few dozen tokens. A query
therefore reads the newest `window` positions of its sequence exactly (fp16, in the codec's
rotated, centred domain, so kernels use them in place of centroids × norms), everything older from
the compressed pages. Pages still hold every token; this buffer is only a better copy of some.

Storage: `rows` rings of `window` entries, per KV head:
    key, value   fp16 [rows · window, H, d]     entry = ring · window + position % window
    tag          int32 [rows · window, H, 2]    (slot, checksum of the key's page norms)
    ring_of_row  int32 [batch rows]             the ring of the step's batch row b (-1: none)
A step writes the newest `window` tokens of every sequence it computes. ring_of_row is the
identity (rows < `rows`) unless the engine gives each request its own ring for its lifetime
(vllm_glue/ring_rows.py: batch rows move between steps). A reader uses an entry only when its tag
matches the slot the block table gives for that position *and* the norms stored on the page
there, so an entry left by another request (a ring handed over, blocks freed and reused) falls
back to the compressed token instead of being read as this one.
"""
from __future__ import annotations

import torch

from .kv_codec import LayerKVCodec

NO_TAG = -1


class RecentTokens:
    def __init__(self, rows: int, window: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", ring_of_row: torch.Tensor | None = None):
        if rows < 1 or window < 1:
            raise ValueError(f"RecentTokens needs rows >= 1 and window >= 1, got {rows}, {window}")
        self.rows, self.window = rows, window
        n = rows * window
        self.key = torch.zeros(n, num_kv_heads, head_dim, dtype=torch.float16, device=device)
        self.value = torch.zeros_like(self.key)
        self.tag = torch.full((n, num_kv_heads, 2), NO_TAG, dtype=torch.int32, device=device)
        # Batch rows beyond it have no ring. Layers may share one (the engine's step mapping).
        self.ring_of_row = (identity_rings(rows, rows, device) if ring_of_row is None
                            else ring_of_row)

    @staticmethod
    def nbytes_per_layer(rows: int, window: int, num_kv_heads: int, head_dim: int) -> int:
        return rows * window * num_kv_heads * (2 * 2 * head_dim + 2 * 4)

    def entries(self, slots: torch.Tensor, query_start_loc: torch.Tensor,
                seq_lens: torch.Tensor) -> torch.Tensor:
        """Ring entry [N] int32 of each new token of a step (-1: not staged). Token i belongs to
        the request whose query range holds i; its position is seq_len - (query end - i). Only a
        sequence's newest `window` tokens are staged. Device ops only (CUDA-graph safe)."""
        num_reqs = seq_lens.shape[0]
        if num_reqs == 0:
            return torch.full(slots.shape, -1, dtype=torch.int32, device=slots.device)
        tok = torch.arange(slots.shape[0], device=slots.device, dtype=query_start_loc.dtype)
        row = torch.searchsorted(query_start_loc[1: num_reqs + 1], tok, right=True)
        valid = (row < min(num_reqs, self.ring_of_row.shape[0])) & (slots >= 0)
        row = row.clamp(max=min(num_reqs, self.ring_of_row.shape[0]) - 1)
        ring = self.ring_of_row.to(slots.device)[row]
        from_end = query_start_loc[row + 1] - tok          # 1 for the sequence's newest token
        pos = seq_lens[row] - from_end
        staged = valid & (ring >= 0) & (from_end <= self.window) & (pos >= 0)
        return torch.where(staged, ring * self.window + pos % self.window, -1).to(torch.int32)

    def write(self, codec: LayerKVCodec, cache: torch.Tensor, slots: torch.Tensor,
              entries: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stage key/value [N, H, d] of tokens whose pages were just written (PyTorch path; the
        Triton write kernel does the same in its epilogue)."""
        keep = entries >= 0
        if not bool(keep.any()):
            return
        e, s = entries[keep].long(), slots[keep]
        k = key[keep].float() - codec.key_mean.to(key.device)
        v = value[keep].float() - codec.value_mean.to(value.device)
        self.key[e] = codec.key.rotate(k, codec.key_perm).to(torch.float16)
        self.value[e] = codec.value.rotate(v, codec.value_perm).to(torch.float16)
        self.tag[e, :, 0] = s.to(torch.int32).unsqueeze(-1)
        self.tag[e, :, 1] = page_checksum(codec, cache, s)

    def lookup(self, row: int, positions: torch.Tensor, slots: torch.Tensor,
               checksums: torch.Tensor) -> torch.Tensor:
        """Which of a sequence's positions [L] (with their slots [L] and page checksums [L, H])
        this buffer holds exactly: bool [L, H]."""
        ring = self.ring(row)
        if ring < 0:
            return torch.zeros(checksums.shape, dtype=torch.bool, device=checksums.device)
        tag = self.tag[self.entry(ring, positions)].to(checksums.device)
        return (tag[..., 0] == slots.to(torch.int32).unsqueeze(-1)) & (tag[..., 1] == checksums)

    def ring(self, row: int) -> int:
        """The ring of batch row `row` (-1: none). Host read: for the PyTorch paths."""
        return int(self.ring_of_row[row]) if row < self.ring_of_row.shape[0] else -1

    def entry(self, ring: int, positions: torch.Tensor) -> torch.Tensor:
        return (ring * self.window + positions % self.window).long()


def identity_rings(batch_rows: int, rings: int, device: torch.device | str) -> torch.Tensor:
    """ring_of_row giving batch row b ring b, and rows >= `rings` none."""
    out = torch.arange(batch_rows, dtype=torch.int32, device=device)
    return torch.where(out < rings, out, -1).to(torch.int32)


def checksum_from_rows(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """int32 [..., H]: the key's two fp16 group norms as stored on the page (bytes [..., H, 2])."""
    both = torch.cat([rows["k.gamma_o"], rows["k.gamma_r"]], dim=-1).contiguous()
    return both.view(torch.int32).squeeze(-1)


def page_checksum(codec: LayerKVCodec, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """checksum_from_rows for tokens already on the pages, by slot: int32 [N, H]."""
    lay = codec.layout
    block, offset = slots.long() // lay.block_size, slots.long() % lay.block_size
    heads = torch.arange(lay.num_kv_heads, device=slots.device) * lay.head_stride
    base = (block * lay.page_bytes).unsqueeze(-1) + heads                    # [N, H]
    flat = cache.view(-1)
    out = {}
    for name in ("k.gamma_o", "k.gamma_r"):
        start = base + lay.regions[name].offset + (offset * 2).unsqueeze(-1)
        out[name] = flat[(start.unsqueeze(-1) + torch.arange(2, device=slots.device)).to(flat.device)]
    return checksum_from_rows(out).to(slots.device)
