"""Launcher for the Triton TurboQuant attention kernel (tq_attention.py); the oracle is
`vllm_turboquant.codec.paged_attention` (see reference.py beside this file).

Per layer and step: rotate the queries (and project them by S for QJL keys) with one batched GEMM
whose per-head matrix folds the outlier split, rotation and tile order, run the kernel over (query
tile, KV head, split), merge the splits (tq_merge.py), rotate the value accumulator back once
(one batched GEMM) and add the value mean. No host
synchronisation and no per-request Python: grid sizes come from static shapes, so a decode step
can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import os

import torch

from vllm_turboquant.codec import LayerKVCodec, RecentTokens

from . import next_pow2, tq_attention, tq_merge
from .launch import VariantLauncher, compiling_only
from .lut_unpack import lut_tables, word_order

LOG2E = 1.4426950408889634
# Decode tiles (one query token) at head_dim <= 128: one warp per program, 64 cached tokens per
# tile (two per thread: Triton then stores the decoded tile to shared memory 16 bytes at a time
# instead of one value at a time), 2 pipeline stages, ~32 programs per SM, K and V decoded in two
# channel halves (channel_chunks). H100, `bench/kernel_decode.py --sweep` (2026-11-23), 16 x 32k /
# 64 x 4k: 3.5_mse 566 / 321 us, 3.5 757 / 407 us, vs 832 / 441 and 1024 / 536 for the former
# 128 tokens x 4 warps x 3 stages x 1056 programs, one chunk. head_dim 256 keeps the former shape
# (two tokens of 256 channels per thread spill).
_DECODE_PROGRAMS, _PREFILL_PROGRAMS = 4224, 1056
_NO_WINDOW = 1 << 30
# Tiles of several query tokens (up to 64 query rows): 128 cached tokens, 4 warps. With 64
# tokens the sm_90 build spilled (776 B of stack for 3.5_mse, head_dim 128; 0 with 128): H100,
# 48 sequences x 16 new tokens over 8k context, 3.8 ms -> 0.67 ms (FA3-bf16 0.56 ms;
# bench/kernel_chunk.py --sweep, docs/kernel_chunk.md).
PREFILL_BLOCK_N = 128


def decode_tile_shape(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of single-token query tiles."""
    return (64, 1, 2) if head_dim <= 128 else (128, 4, 3)


_DECODE_MAX_REGISTERS = 168  # 12 one-warp programs per SM (H100: 64k registers)
_TAIL_BLOCK_N = 64  # the exact-copies launch covers ~64 positions per sequence
# Its [64, d] fp16 tiles of exact copies: 1 warp spills at 255 registers, 4 warps need 128
# (bench/compile_report.py, sm_90).
_TAIL_WARPS = 4
# The split merge: one warp per (query row, 32 channels), 32 splits per step. Against one program
# per row (16 splits per step, 4 warps): 1 x 32k decode 93.2 -> 81.3 us, merge 12.3 -> 4.0 us
# (H100, 2026-11-24, docs/kernel_decode.md); 4 warps or 64 splits per step were 1-3 us slower.
_MERGE_BLOCK_S = 32
_MERGE_DB = 32
_MERGE_WARPS = 1


# The PTX look-ups run on NVIDIA GPUs; Triton's interpreter (CPU tests; on before triton is
# imported) and ROCm take the kernel's plain-Triton path.
_PTX = os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None


class AttentionConstants:
    """Device copies of one layer codec's rotations, codebooks and per-query-head tables.

    Built once per (codec, device, query heads); `refresh` rewrites them in place when calibration
    changes the codec, so CUDA graphs captured before calibration read the calibrated values."""

    def __init__(self, codec: LayerKVCodec, num_q_heads: int, device: torch.device):
        kc = codec.key
        self.group = num_q_heads // codec.layout.num_kv_heads
        self.n_o, self.n_r = kc.n_o, kc.n_r
        self.unit = 32 if kc.n_o % 32 == 0 else 16  # channels per plane word (16 at d = 64)
        self.device = device
        self.version = None
        # The kernels' launchers per variant: their compile-time constants are the layout's, so
        # calibration never changes them.
        self.launchers: dict[tuple, tuple] = {}
        self._half: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}  # see rotations()
        self.refresh(codec)

    def refresh(self, codec: LayerKVCodec) -> None:
        kc, vc, g, dev = codec.key, codec.value, self.group, self.device
        f32 = dict(dtype=torch.float32, device=dev)
        # The kernel sees channels in tile order: fold that permutation into the rotations (rows
        # of the block-diagonal [outliers, regular] rotation, for queries and for value outputs).
        d = self.n_o + self.n_r
        perm = tile_order(d, self.unit, channel_chunks(d))
        groups = [(kc.outlier, kc.fmt.outlier_bits), (kc.regular, kc.fmt.regular_bits),
                  (vc.outlier, vc.fmt.outlier_bits), (vc.regular, vc.fmt.regular_bits)]
        signs = torch.tensor([-1.0, 1.0])
        codebooks = torch.zeros(5, 16)
        for i, c in enumerate([q.centroids for q, _ in groups] + [signs]):
            codebooks[i, : c.numel()] = c
        tables = torch.stack([lut_tables(q.centroids, bits) for q, bits in groups]
                             + [lut_tables(signs, 1)])
        qjl = (kc.qjl.float() * kc.qjl_scale)[perm][:, perm] if kc.fmt.has_qjl else None
        r_k_tiles = torch.block_diag(kc.outlier.rotation, kc.regular.rotation).float()[perm]
        r_v_tiles = torch.block_diag(vc.outlier.rotation, vc.regular.rotation).float()[perm]
        # Per KV head, tile-ordered rotated keys → original channels. Its transpose takes queries
        # the other way (split gather, rotation, tile order) in one GEMM; for QJL keys S·q rides
        # along as d more columns, and the dense read (tq_dequant.py) takes sign tiles back
        # through Sᵀ first.
        k_back = _back_rotations(r_k_tiles, codec.key_perm)                 # [Hkv, d, d]
        q_rotation = k_back.transpose(1, 2)
        if qjl is not None:
            q_rotation = torch.cat([q_rotation, q_rotation @ qjl.T], dim=-1)  # [Hkv, d, 2d]
        fresh = dict(
            codebooks=codebooks.to(dev, torch.float16), tables=tables.to(dev),
            q_rotation=q_rotation.repeat_interleave(g, 0).to(**f32),        # [Hq, d, d or 2d]
            key_mean=codec.key_mean.to(**f32).repeat_interleave(g, 0),      # [Hq, d]
            value_mean=codec.value_mean.to(**f32).unsqueeze(1),             # [Hkv, 1, d]
            r_back=_back_rotations(r_v_tiles, codec.value_perm).to(**f32),  # [Hkv, d, d]
            k_back=k_back.to(**f32),
            qjl_back=(qjl @ k_back if qjl is not None else torch.zeros(1)).to(**f32),
            key_mean_kv=codec.key_mean.to(**f32),                           # [Hkv, d]
        )
        for name, t in fresh.items():
            if self.version is None:
                setattr(self, name, t.contiguous())
            else:
                getattr(self, name).copy_(t)
        for copies in self._half.values():
            for dst, src in zip(copies, self._rotations32()):
                dst.copy_(src)
        self.has_qjl = kc.fmt.has_qjl
        self.version = codec.version

    def _rotations32(self) -> tuple[torch.Tensor, ...]:
        return self.q_rotation, self.r_back, self.value_mean

    def rotations(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(q_rotation, r_back, value_mean) for queries of `dtype`: bf16/fp16 copies run the two
        per-step GEMMs on tensor cores (fp32 ones took 8 us each at 48 x 32 heads on the H100,
        a third of the step's overhead beside the kernel). Built on first use (vLLM's warm-up,
        before graph capture), refreshed in place with the rest."""
        if dtype not in (torch.bfloat16, torch.float16):
            return self._rotations32()
        copies = self._half.get(dtype)
        if copies is None:
            copies = self._half[dtype] = tuple(t.to(dtype) for t in self._rotations32())
        return copies

    @classmethod
    def of(cls, codec: LayerKVCodec, num_q_heads: int, device: torch.device) -> "AttentionConstants":
        key = (str(device), num_q_heads)
        cache = codec.__dict__.setdefault("_attention_constants", {})
        c = cache.get(key)
        if c is None:
            c = cache[key] = cls(codec, num_q_heads, device)
        elif c.version != codec.version:
            c.refresh(codec)
        return c


def _back_rotations(r: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Per KV head, the matrix taking tile-ordered, rotated vectors (value accumulators, decoded
    keys) to the original channels: rotate back (r, rows in tile order), then put split channel j
    at perm[h, j] (a column permutation)."""
    inverse = torch.argsort(perm.cpu(), dim=-1)                      # [Hkv, d]
    return torch.stack([r[:, inv] for inv in inverse])


def channel_chunks(head_dim: int) -> int:
    """Channel chunks the kernel decodes K and V in (one tl.dot each): two halves from head_dim
    128 on. Measured faster (H100 sweep, 16 x 32k: 3.5 757 vs 946 us, 3.5_mse 566 vs 587); ptxas
    still uses its 255 registers either way, so the gain is in how it schedules the halves."""
    return 2 if head_dim >= 128 else 1


def tile_order(head_dim: int, unit: int, chunks: int = 1) -> torch.Tensor:
    """Channel at each position c·dc + w·unit + q of a decoded K/V tile (tq_attention.py,
    dc = head_dim / chunks channels per chunk c): word c·dc/unit + w's position q
    (lut_unpack.word_order). Outlier channels come first, as in the codec."""
    dc = head_dim // chunks
    words = dc // unit
    p = torch.arange(head_dim)
    c, p = p // dc, p % dc
    return (c * words + p // unit) * unit + word_order(unit)[p % unit]


def page_constants(codec: LayerKVCodec, c: AttentionConstants, device: torch.device,
                   recent: RecentTokens | None) -> dict:
    """The compile-time constants of a layer's pages that every kernel reading them takes: shapes,
    bit widths, region offsets (codec/layout.py), exact copies or not, PTX look-ups or not."""
    lay, kc, vc = codec.layout, codec.key, codec.value
    off = {name: r.offset for name, r in lay.regions.items()}
    d = lay.head_dim
    return dict(
        HKV=lay.num_kv_heads, D=d, DC=d // channel_chunks(d), N_O=c.n_o, U=c.unit,
        BS=lay.block_size, KBO=kc.fmt.outlier_bits, KBR=kc.fmt.regular_bits,
        VBO=vc.fmt.outlier_bits, VBR=vc.fmt.regular_bits, HAS_QJL=kc.fmt.has_qjl,
        HAS_RECENT=recent is not None, USE_ASM=_PTX and device.type == "cuda",
        OFF_KCO=off["k.codes_o"], OFF_KCR=off["k.codes_r"], OFF_KS=off.get("k.signs", 0),
        OFF_KGO=off["k.gamma_o"], OFF_KGR=off["k.gamma_r"], OFF_KRN=off.get("k.rnorm", 0),
        OFF_VCO=off["v.codes_o"], OFF_VCR=off["v.codes_r"], OFF_VGO=off["v.gamma_o"],
        OFF_VGR=off["v.gamma_r"],
    )


def _rotate_queries(c: AttentionConstants, query: torch.Tensor):
    """Queries [T, Hq, d] → (q, S·q) in tile order, head-major views [Hq, T, d] of one batched
    GEMM in the queries' dtype (fp32 accumulation; S·q is q for MSE-only keys)."""
    d = query.shape[-1]
    qs = torch.bmm(query.transpose(0, 1), c.rotations(query.dtype)[0])   # [Hq, T, d or 2d]
    return qs[..., :d], (qs[..., d:] if c.has_qjl else qs[..., :d])


def varlen_attention(codec: LayerKVCodec, query: torch.Tensor, cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                     sliding_window: int | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, target_programs: int | None = None,
                     recent: RecentTokens | None = None, context_only: bool = False,
                     return_lse: bool = False, swap: bool = True, block_q: int | None = None,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence i owns queries query[qsl[i]:qsl[i+1]] ([T, Hq, d]), the last positions of its
    seq_lens[i] tokens, whose K/V are already in the cache [num_blocks, page_bytes]. Causal.
    max_query_len only picks the tile shape (any upper bound works). With `recent`, sequence i
    (batch row i) reads its newest positions from their exact copies where the tags match.
    context_only: attend to the earlier context only, not to the queries' own positions (the
    caller attends those exactly and merges with `merge_attention`).
    Returns [T, Hq, d] in the queries' dtype (bf16, fp16; else float32), or float32 with
    return_lse and the base-2 log-sum-exp of the scaled scores [T, Hq] (-inf for a row that saw
    no key).
    swap: single-token tiles with the query rows as the mma's N dimension (tq_attention's SWAP),
    padded to 8 rather than 16: 255 -> 168 registers, H100 16 x 32k decode 540 -> 472 us
    (docs/kernel_decode.md); False only to compare.
    block_q: query tokens per tile (default: 1 for decode, else as many as fill 64 rows); 1 runs
    every token as its own decode row."""
    lay = codec.layout
    num_tokens, hq, d = query.shape
    num_seqs = seq_lens.shape[0]
    c = AttentionConstants.of(codec, hq, query.device)
    q, sq = _rotate_queries(c, query)

    g_p2 = next_pow2(c.group)
    if block_q is None:  # one multi-token shape (64 rows), compiled at start-up (warm_up)
        block_q = 1 if max_query_len == 1 else max(1, 64 // g_p2)
    swap = swap and block_q == 1 and g_p2 <= 8
    block_m = max(8 if swap else 16, block_q * g_p2)
    shape = (*decode_tile_shape(d), _DECODE_PROGRAMS) if block_q == 1 else \
        (PREFILL_BLOCK_N, 4, None, _PREFILL_PROGRAMS)
    block_n, num_warps, num_stages, target_programs = (
        a if a is not None else b
        for a, b in zip((block_n, num_warps, num_stages, target_programs), shape))
    if block_q == 1:  # one tile per query token: the tile offsets are the query offsets
        tiles = query_start_loc
    else:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        tiles = torch.zeros(num_seqs + 1, dtype=torch.int32, device=query.device)
        torch.cumsum((q_lens + block_q - 1) // block_q, 0, out=tiles[1:])
    # static bounds on the tile count (decode: one per sequence)
    max_tiles = num_seqs if max_query_len == 1 else \
        num_tokens if block_q == 1 else num_tokens // block_q + num_seqs

    max_tokens = block_table.shape[1] * lay.block_size  # static bound: no host sync
    if num_splits is None:
        wanted = math.ceil(target_programs / max(1, max_tiles * lay.num_kv_heads))
        num_splits = max(1, min(wanted, math.ceil(max_tokens / (4 * block_n))))
    per_split = math.ceil(math.ceil(max_tokens / num_splits) / block_n) * block_n
    # Every (query row, split) is written by exactly one program; with exact copies of the newest
    # tokens, one more split holds them (written by the TAIL launch).
    slots = num_splits + (recent is not None)
    f32 = dict(dtype=torch.float32, device=query.device)
    part_m = torch.empty(num_tokens, hq, slots, **f32)
    part_l = torch.empty(num_tokens, hq, slots, **f32)
    part_o = torch.empty(num_tokens, hq, slots, d, **f32)

    st = (recent.key, recent.value, recent.tag, recent.ring_of_row) if recent is not None \
        else (cache,) * 4
    args = (q, sq, cache, block_table, seq_lens, query_start_loc, tiles,
            c.codebooks, c.tables, part_m, part_l, part_o, *st,
            scale * LOG2E, q.stride(1), q.stride(0), block_table.stride(0), lay.page_bytes,
            lay.head_stride, per_split,
            slots, num_seqs, sliding_window or _NO_WINDOW,
            recent.ring_of_row.shape[0] if recent is not None else 0,
            recent.window if recent is not None else 1)
    # The launchers of this variant, built once (this runs every layer, every step, on the host).
    variant = (hq, block_q, block_m, block_n, context_only, recent is not None, return_lse,
               num_warps, num_stages, swap, query.device.type)
    launchers = c.launchers.get(variant)
    if launchers is None:
        launchers = c.launchers[variant] = _attention_launchers(
            codec, c, query.device, recent, hq, g_p2, block_q, block_m, block_n, context_only,
            return_lse, num_warps, num_stages, swap)
    main, tail, merge = launchers
    # The exact copies' launch runs on the same stream: forking it to a side stream under graph
    # capture cost 7-10 us per step at batch 1 and gained nothing at 16-48 (H100, 2026-11-24).
    main((max_tiles, lay.num_kv_heads, num_splits), *args)
    if recent is not None:
        tail((max_tiles, lay.num_kv_heads, 1), *args)

    # Merge the splits (tq_merge.py, head-major), then one batched GEMM per KV head (its query
    # heads are adjacent rows) rotates back, undoing the tile order and the outlier/regular split
    # too, and adds the value mean.
    # Without the log-sum-exp (a merge with the exact new tokens needs fp32) the merged output is
    # stored in the queries' dtype and rotated back in it: its rounding is that of the output.
    _, r_back, value_mean = c.rotations(torch.float32 if return_lse else query.dtype)
    y = torch.empty(hq, num_tokens, d, dtype=r_back.dtype, device=query.device)
    lse = torch.empty(num_tokens, hq, **f32) if return_lse else y
    if num_tokens:
        merge((num_tokens, hq, d // merge.constexprs["DB"]), part_m, part_l, part_o,
              query.contiguous() if return_lse else y, c.key_mean, y, lse, num_tokens, slots,
              scale * LOG2E)
    hkv = lay.num_kv_heads
    out = torch.baddbmm(value_mean, y.view(hkv, -1, d), r_back)
    out = out.view(hq, num_tokens, d).transpose(0, 1)
    return (out, lse) if return_lse else out


def _attention_launchers(codec: LayerKVCodec, c: AttentionConstants, device: torch.device,
                         recent: RecentTokens | None, hq: int, g_p2: int, block_q: int,
                         block_m: int, block_n: int, context_only: bool, return_lse: bool,
                         num_warps: int, num_stages: int | None, swap: bool) -> tuple:
    """(main, exact-copy tail, merge) launchers of one attention variant."""
    meta = dict(HQ=hq, G=c.group, G_P2=g_p2, BLOCK_Q=block_q, BLOCK_M=block_m,
                CONTEXT_ONLY=context_only, SWAP=swap, **page_constants(codec, c, device, recent),
                num_warps=num_warps)
    if num_stages is not None:  # else Triton's default
        meta["num_stages"] = num_stages
    kernel = tq_attention.tq_attention_kernel
    main = dict(meta)
    if num_warps == 1:  # its tag check in the newest tiles alone would take 168 -> 178 registers
        main["maxnreg"] = _DECODE_MAX_REGISTERS
    return (VariantLauncher(kernel, BLOCK_N=block_n, TAIL=False, **main),
            VariantLauncher(kernel, BLOCK_N=min(block_n, _TAIL_BLOCK_N), TAIL=True,
                            **dict(meta, num_warps=_TAIL_WARPS)),
            VariantLauncher(tq_merge.tq_merge_kernel, HQ=hq, D=codec.layout.head_dim,
                            DB=min(codec.layout.head_dim, _MERGE_DB), BLOCK_S=_MERGE_BLOCK_S,
                            HAS_LSE=return_lse, num_warps=_MERGE_WARPS))


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets → attention over their union: outputs [T, Hq, d]
    weighted by their base-2 log-sum-exps [T, Hq] (-inf: the set was empty for that row; at least
    one of the two must be finite)."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp2(lse_a - top), torch.exp2(lse_b - top)
    return (out_a * w_a[..., None] + out_b * w_b[..., None]) / (w_a + w_b)[..., None]


def decode_attention(codec: LayerKVCodec, query: torch.Tensor, cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     sliding_window: int | None = None, **tuning) -> torch.Tensor:
    """One query token per sequence: query [B, Hq, d] → [B, Hq, d] (varlen_attention's dtype)."""
    qsl = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
    return varlen_attention(codec, query, cache, block_table, seq_lens, qsl, scale, 1,
                            sliding_window, **tuning)


def warm_up(codec: LayerKVCodec, num_q_heads: int, device: torch.device,
            sliding_window: int | None = None, recent: RecentTokens | None = None,
            dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile the kernel variants vLLM's steps use now (engine start-up), so no request ever
    waits for Triton's JIT: all at once on threads, then run each once on two scratch pages
    (which loads its module outside any CUDA-graph capture). dtype: the model's (queries, K/V)."""
    with compiling_only():
        _run_variants(codec, num_q_heads, device, sliding_window, recent, dtype)
    _run_variants(codec, num_q_heads, device, sliding_window, recent, dtype)


def _run_variants(codec: LayerKVCodec, num_q_heads: int, device: torch.device,
                  sliding_window: int | None, recent: RecentTokens | None,
                  dtype: torch.dtype) -> None:
    from .cache_write import CHUNK_TOKENS, write_kv
    from .dense_context import context_span, dequantize_context

    lay = codec.layout
    pages = torch.zeros(2, lay.page_bytes, dtype=torch.uint8, device=device)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([lay.block_size + 1], dtype=torch.int32, device=device)
    # The writes of a decode step's and of a prompt chunk's new tokens (their own warp counts;
    # slot -1: nothing is stored, nothing staged).
    for n in (1, CHUNK_TOKENS + 1):
        kv = torch.zeros(n, lay.num_kv_heads, lay.head_dim, device=device, dtype=dtype)
        skip = torch.full((n,), -1, dtype=torch.long, device=device)
        write_kv(codec, pages, skip, kv, kv, recent,
                 skip.int() if recent is not None else None)
    # Decode; and over the context only, single- and multi-token tiles: the backend's mixed steps
    # (where only decodes have context the tiles are single-token). Without FlashAttention,
    # multi-token steps run causal over everything and compile at first use.
    for q_len, context_only in ((1, False), (1, True), (2, True)):
        query = torch.zeros(q_len, num_q_heads, lay.head_dim, device=device, dtype=dtype)
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device=device)
        varlen_attention(codec, query, pages, table, lens, qsl, 1.0, q_len, sliding_window,
                         recent=recent, context_only=context_only, return_lse=context_only)
    if sliding_window is None:  # long chunks' dense context reads
        span = context_span(torch.tensor([0]), lens.cpu(), device)
        dequantize_context(codec, pages, table, lens, span, num_q_heads, dtype, recent)
