"""Attention straight from packed pages: the oracle every GPU kernel is tested against.

Per KV head, the query is rotated once per group (and projected by S once for QJL keys); scores are
taken against centroids × norms (+ the QJL term), values are accumulated in their rotated domain and
rotated back once per query. Nothing is decoded into the original channel order except the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kv_codec import LayerKVCodec
from .recent import RecentTokens, checksum_from_rows


@dataclass
class ExactTokens:
    """Keys [L, H, d] and values [L, H, d] in the rotated, centred domain that replace the
    compressed ones where `mask` [L, H] is set (see recent.py)."""

    mask: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    causal: bool = True, sliding_window: int | None = None) -> torch.Tensor:
    """Plain attention of query [Tq, Hq, d] over key/value [L, H, d]; the Tq queries are the last
    Tq positions of the L-token sequence. Returns [Tq, Hq, d] float32."""
    tq, hq, d = query.shape
    length, h, _ = key.shape
    g = hq // h
    q = query.float().view(tq, h, g, d)
    scores = torch.einsum("thgd,lhd->hgtl", q, key.float()) * scale
    scores = scores.masked_fill(~_mask(tq, length, causal, sliding_window, query.device), -math.inf)
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hgtl,lhd->thgd", p, value.float()).reshape(tq, hq, d)


def _mask(tq: int, length: int, causal: bool, window: int | None, device,
          key_start: int = 0) -> torch.Tensor:
    """[tq, length - key_start] keys allowed for the last tq positions of a length-token sequence,
    for keys at positions key_start..length-1."""
    pos_q = torch.arange(length - tq, length, device=device).view(-1, 1)
    pos_k = torch.arange(key_start, length, device=device).view(1, -1)
    allowed = torch.ones(tq, length - key_start, dtype=torch.bool, device=device)
    if causal:
        allowed &= pos_k <= pos_q
    if window is not None:
        allowed &= pos_q - pos_k < window
    return allowed


def attend_packed(codec: LayerKVCodec, query: torch.Tensor, rows: dict[str, torch.Tensor],
                  scale: float, causal: bool = True, sliding_window: int | None = None,
                  key_start: int = 0, exact: ExactTokens | None = None) -> torch.Tensor:
    """query [Tq, Hq, d] over the packed rows {region: uint8 [L - key_start, H, row]} holding the
    keys at positions key_start..L-1 of one sequence (its queries are its last Tq positions).
    `exact` replaces some of those tokens by exact copies."""
    tq, hq, d = query.shape
    h = codec.layout.num_kv_heads
    g = hq // h
    qk, qv = codec.unpack(rows)
    num_keys = qk.codes_o.shape[0]
    kc, vc = codec.key, codec.value

    q_rot = kc.rotate(query.float().view(tq, h, g, d).transpose(1, 2), codec.key_perm)  # [Tq, G, H, d]
    # Keys are stored centred (k - μ): q·μ is the same for every key of a query, so it cancels in
    # the softmax and the scores use the centred keys as they are.
    keys, values = kc.mse_rotated(qk), vc.dequantize_rotated(qv)
    if exact is not None:
        keys = torch.where(exact.mask.unsqueeze(-1), exact.key.float(), keys)
        values = torch.where(exact.mask.unsqueeze(-1), exact.value.float(), values)
    scores = torch.einsum("tghd,lhd->hgtl", q_rot, keys)
    if kc.fmt.has_qjl:
        sq = q_rot @ kc.qjl.to(q_rot.device).T                        # S·q, once per query
        signs = qk.signs.float() * 2 - 1                              # [L, H, d]
        qjl = torch.einsum("tghd,lhd->hgtl", sq, signs)
        rnorm = qk.rnorm.float() if exact is None else qk.rnorm.float().masked_fill(exact.mask, 0)
        scores = scores + kc.qjl_scale * qjl * rnorm.T.view(h, 1, 1, num_keys)
    scores = scores * scale
    allowed = _mask(tq, key_start + num_keys, causal, sliding_window, query.device, key_start)
    scores = scores.masked_fill(~allowed, -math.inf)
    p = torch.softmax(scores, dim=-1)
    acc = torch.einsum("hgtl,lhd->tghd", p, values)  # rotated value domain
    out = vc.unrotate(acc, codec.value_perm) + codec.value_mean.to(acc.device)  # rotate back once
    return out.transpose(1, 2).reshape(tq, hq, d)


def paged_attention(codec: LayerKVCodec, query: torch.Tensor, cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, causal: bool = True,
                    sliding_window: int | None = None,
                    recent: RecentTokens | None = None) -> torch.Tensor:
    """Varlen paged attention. Sequence i owns queries query[qsl[i]:qsl[i+1]], which are the last
    positions of its seq_lens[i] tokens (already written to the cache). With `recent`, sequence i's
    newest recent.window positions are read from its exact copies where their tags match.
    Returns [T, Hq, d] float32."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    bs = codec.layout.block_size
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, length in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if b == a or length == 0:
            continue
        first = 0
        if sliding_window is not None:  # blocks wholly before the window may be freed: skip them
            first = max(0, length - (b - a) - sliding_window + 1) // bs
        blocks = block_table[i, first: (length + bs - 1) // bs]
        rows = {k: v[: length - first * bs] for k, v in codec.read_blocks(cache, blocks).items()}
        exact = None
        if recent is not None:
            exact = _exact_tokens(recent, i, rows, blocks, first * bs, length, bs)
        out[a:b] = attend_packed(codec, query[a:b], rows, scale, causal, sliding_window,
                                 key_start=first * bs, exact=exact)
    return out


def context_kv(codec: LayerKVCodec, cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
               recent: RecentTokens | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached positions [starts[i], ends[i]) of every sequence i (seq_lens[i] tokens long),
    decoded to keys and values [N, H, d] float32 in the original channel order, sequences
    concatenated in order: what dense attention over the cached context reads. With `recent`,
    tokens that have exact copies (recent.py) come from them."""
    bs = codec.layout.block_size
    keys, values = [], []
    for i, (a, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        if e <= a:
            continue
        blocks = block_table[i, : (e + bs - 1) // bs]
        rows = {k: v[:e] for k, v in codec.read_blocks(cache, blocks).items()}
        qk, qv = codec.unpack(rows)
        k_rot, v_rot = codec.key.dequantize_rotated(qk), codec.value.dequantize_rotated(qv)
        if recent is not None:
            exact = _exact_tokens(recent, i, rows, blocks, 0, e, bs, int(seq_lens[i]))
            k_rot = torch.where(exact.mask.unsqueeze(-1), exact.key.float(), k_rot)
            v_rot = torch.where(exact.mask.unsqueeze(-1), exact.value.float(), v_rot)
        keys.append(codec.key.unrotate(k_rot[a:], codec.key_perm) + codec.key_mean.to(k_rot.device))
        values.append(codec.value.unrotate(v_rot[a:], codec.value_perm)
                      + codec.value_mean.to(v_rot.device))
    if not keys:
        empty = torch.zeros(0, codec.layout.num_kv_heads, codec.layout.head_dim)
        return empty, empty.clone()
    return torch.cat(keys), torch.cat(values)


def _exact_tokens(recent: RecentTokens, row: int, rows: dict[str, torch.Tensor],
                  blocks: torch.Tensor, key_start: int, length: int, bs: int,
                  seq_len: int | None = None) -> ExactTokens:
    """Exact copies of positions key_start..length-1 of a sequence of seq_len (default: length)
    tokens: only its newest recent.window positions can have one."""
    pos = torch.arange(key_start, length, device=blocks.device)
    slots = blocks.long().repeat_interleave(bs)[: length - key_start] * bs + pos % bs
    mask = recent.lookup(row, pos, slots, checksum_from_rows(rows))
    newest = (length if seq_len is None else seq_len) - recent.window
    mask &= (pos >= newest).unsqueeze(-1).to(mask.device)
    e = recent.entry(max(recent.ring(row), 0), pos).clamp(max=recent.key.shape[0] - 1)
    return ExactTokens(mask, recent.key[e].to(mask.device), recent.value[e].to(mask.device))
