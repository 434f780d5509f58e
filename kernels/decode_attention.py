"""Launcher for the Triton TurboQuant decode kernel (tq_decode.py); the oracle is
`vllm_turboquant.codec.paged_attention` (see reference.py beside this file).

Per layer and step: rotate the query once per channel group (and project it by S once for QJL keys),
run the kernel over (sequence, KV head, split), merge the splits, rotate the value accumulator back
once and add the value mean. No host synchronisation: split counts come from static shapes.
"""
from __future__ import annotations

import math

import torch

from vllm_turboquant.codec import LayerKVCodec

from . import next_pow2, tq_decode

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 264  # ~2 waves of programs on a 132-SM H100


class DecodeConstants:
    """Device copies of one layer codec's rotations, codebooks and per-query-head tables."""

    def __init__(self, codec: LayerKVCodec, num_q_heads: int, device: torch.device):
        lay, kc, vc = codec.layout, codec.key, codec.value
        g = num_q_heads // lay.num_kv_heads
        f32 = dict(dtype=torch.float32, device=device)
        self.r_ko, self.r_kr = kc.outlier.rotation.to(**f32), kc.regular.rotation.to(**f32)
        self.r_vo, self.r_vr = vc.outlier.rotation.to(**f32), vc.regular.rotation.to(**f32)
        self.cb = [q.centroids.to(**f32) for q in (kc.outlier, kc.regular, vc.outlier, vc.regular)]
        self.qjl = (kc.qjl.to(**f32) * kc.qjl_scale) if kc.fmt.has_qjl else None
        self.key_perm = codec.key_perm.to(device).repeat_interleave(g, 0)      # [Hq, d]
        self.value_perm = codec.value_perm.to(device).repeat_interleave(g, 0)  # [Hq, d]
        self.value_mean = codec.value_mean.to(**f32).repeat_interleave(g, 0)   # [Hq, d]
        self.n_o, self.n_r = kc.n_o, kc.n_r
        self.n_r_pad = next_pow2(kc.n_r)
        self.group = g

    @classmethod
    def of(cls, codec: LayerKVCodec, num_q_heads: int, device: torch.device) -> "DecodeConstants":
        # Cached on the codec; rebuilt if calibration replaced the splits or means since.
        key = (str(device), num_q_heads, id(codec.key_perm), id(codec.value_perm),
               id(codec.value_mean))
        cached = getattr(codec, "_decode_constants", None)
        if cached is None or cached[0] != key:
            codec._decode_constants = (key, cls(codec, num_q_heads, device))
        return codec._decode_constants[1]


def decode_attention(codec: LayerKVCodec, query: torch.Tensor, cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence: query [B, Hq, d] → [B, Hq, d] float32.

    cache is the layer's uint8 pages [num_blocks, page_bytes]; block_table [B, max_blocks] and
    seq_lens [B] are vLLM's (the new token's K/V already written)."""
    lay = codec.layout
    batch, hq, d = query.shape
    c = DecodeConstants.of(codec, hq, query.device)
    kc, vc = codec.key, codec.value

    # Rotate the query once per group (outlier channels first, as the keys were stored).
    qp = torch.gather(query.float(), -1, c.key_perm.expand(batch, hq, d))
    q_o = qp[..., : c.n_o] @ c.r_ko.T
    q_r = qp[..., c.n_o:] @ c.r_kr.T
    sq = torch.cat([q_o, q_r], -1) @ c.qjl.T if c.qjl is not None else q_o
    q_r = torch.nn.functional.pad(q_r, (0, c.n_r_pad - c.n_r))

    block_n = 64
    max_tokens = block_table.shape[1] * lay.block_size  # static bound: no host sync
    if num_splits is None:
        wanted = math.ceil(_TARGET_PROGRAMS / (batch * lay.num_kv_heads))
        num_splits = max(1, min(wanted, math.ceil(max_tokens / (4 * block_n))))
    per_split = math.ceil(math.ceil(max_tokens / num_splits) / block_n) * block_n
    f32 = dict(dtype=torch.float32, device=query.device)
    part_m = torch.empty(batch, hq, num_splits, **f32)
    part_l = torch.empty(batch, hq, num_splits, **f32)
    part_o = torch.empty(batch, hq, num_splits, c.n_o, **f32)
    part_r = torch.empty(batch, hq, num_splits, c.n_r_pad, **f32)

    off = {name: r.offset for name, r in lay.regions.items()}
    tq_decode.tq_decode_kernel[(batch, lay.num_kv_heads, num_splits)](
        q_o.contiguous(), q_r.contiguous(), sq.contiguous(), cache, block_table, seq_lens,
        *c.cb, part_m, part_l, part_o, part_r,
        scale * _LOG2E, block_table.stride(0), lay.page_bytes, lay.head_stride, per_split,
        HQ=hq, G=c.group, G_PAD=max(16, next_pow2(c.group)), D=d, N_O=c.n_o, N_R=c.n_r,
        N_R_PAD=c.n_r_pad, BS=lay.block_size, BLOCK_N=block_n, SPLITS=num_splits,
        KBO=kc.fmt.outlier_bits, KBR=kc.fmt.regular_bits, VBO=vc.fmt.outlier_bits,
        VBR=vc.fmt.regular_bits, HAS_QJL=kc.fmt.has_qjl,
        OFF_KCO=off["k.codes_o"], OFF_KCR=off["k.codes_r"], OFF_KS=off.get("k.signs", 0),
        OFF_KGO=off["k.gamma_o"], OFF_KGR=off["k.gamma_r"], OFF_KRN=off.get("k.rnorm", 0),
        OFF_VCO=off["v.codes_o"], OFF_VCR=off["v.codes_r"], OFF_VGO=off["v.gamma_o"],
        OFF_VGR=off["v.gamma_r"], num_warps=4,
    )

    # Merge the splits (base-2 log-sum-exp), then rotate the value accumulator back once.
    top = part_m.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp2(part_m - top)                                       # empty splits: weight 0
    denom = (w * part_l).sum(-1, keepdim=True).clamp_min(1e-30)
    acc_o = (w.unsqueeze(-1) * part_o).sum(-2) / denom
    acc_r = (w.unsqueeze(-1) * part_r).sum(-2)[..., : c.n_r] / denom
    out_perm = torch.cat([acc_o @ c.r_vo, acc_r @ c.r_vr], -1)
    out = torch.empty_like(out_perm).scatter_(-1, c.value_perm.expand(batch, hq, d), out_perm)
    return out + c.value_mean
