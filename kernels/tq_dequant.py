"""Triton: cached TurboQuant context → dense K/V in the model's dtype, once per step.

A long prompt chunk reads its context through FlashAttention over these (dense_context.py) instead
of the paged kernel, which would decode every cached token once per 16-token query tile.

One program per (tile of BLOCK_N positions of one sequence's range, KV head). The tile is decoded
exactly as the attention kernel does (tq_attention.py: register look-ups, per-token scales, tile
order, channel chunks), then taken back to the original channels by one tl.dot per chunk with a
per-head matrix that folds the inverse rotation, the tile order and the outlier split (and for QJL
keys Sᵀ and its constant), plus the per-head mean; in OUT_SPLIT column blocks of that matrix
where a whole one would not fit the GPU's shared memory. Exact copies of the newest tokens
replace their decoded tokens, as in the attention kernel.
"""
import triton
import triton.language as tl

from .tq_attention import (_chunk, _chunk_channels, _exact_copies, _find_seq, _norm16, _ring,
                           _scales, _sign_chunk, _staged)


@triton.jit
def _rows(M, h, c: tl.constexpr, o, D: tl.constexpr, DC: tl.constexpr, DO: tl.constexpr):
    """Rows c·DC .. c·DC + DC - 1, columns o·DO .. o·DO + DO - 1 of head h's [D, D] matrix, fp16
    [DC, DO]."""
    r = c * DC + tl.arange(0, DC)
    cols = o * DO + tl.arange(0, DO)
    return tl.load(M + h * D * D + r[:, None] * D + cols[None, :]).to(tl.float16)


@triton.jit
def _back(x0, x1, M, h, o, D: tl.constexpr, DC: tl.constexpr, DO: tl.constexpr):
    """[x0 | x1] (fp16 [BLOCK_N, D] in tile order, as chunks) @ M[h][:, o·DO:(o+1)·DO] → fp32
    [BLOCK_N, DO]."""
    y = tl.dot(x0, _rows(M, h, 0, o, D, DC, DO))
    if DC < D:
        y += tl.dot(x1, _rows(M, h, 1, o, D, DC, DO))
    return y


@triton.jit
def _store_block(x, ST, ent, ex, M, MEAN, OUT, rows, tok_mask, h, o, D: tl.constexpr,
                 DC: tl.constexpr, DO: tl.constexpr, U: tl.constexpr, HAS_RECENT: tl.constexpr):
    """Column block o of K or V (x fp32 [BLOCK_N, DO], original channels): exact copies (entries
    ent where ex) replace their decoded tokens, the head's mean is added, and the rows stored."""
    if HAS_RECENT:
        if tl.max(ex.to(tl.int32), 0) > 0:  # only the context's newest tiles have copies
            C1: tl.constexpr = (D - DC) // DC  # chunk 1 (with one chunk: 0 again, unused)
            xe = _back(_staged(ST, ent, ex, _chunk_channels(0, DC, U), D),
                       _staged(ST, ent, ex, _chunk_channels(C1, DC, U), D), M, h, o, D, DC, DO)
            x = tl.where(ex[:, None], xe, x)
    cols = o * DO + tl.arange(0, DO)
    x += tl.load(MEAN + h * D + cols)[None, :]
    tl.store(OUT + rows + cols[None, :], x.to(OUT.dtype.element_ty), mask=tok_mask[:, None])


# Runtime sizes must not specialise the kernel (a new batch would recompile).
@triton.jit(do_not_specialize=["stride_bt", "num_seqs", "st_rows", "st_window"])
def tq_dequant_kernel(
    CACHE, BLOCK_TABLE, SEQ_LENS, STARTS, CU_KEYS, CU_TILES, CB, TAB,
    K_BACK, QJL_BACK, V_BACK, K_MEAN, V_MEAN, OUT_K, OUT_V, ST_K, ST_V, ST_TAG, ST_ROW,
    stride_bt, page_bytes, head_stride, num_seqs, st_rows, st_window,
    HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, N_O: tl.constexpr, U: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr,
    VBO: tl.constexpr, VBR: tl.constexpr, HAS_QJL: tl.constexpr, HAS_RECENT: tl.constexpr,
    USE_ASM: tl.constexpr, OUT_SPLIT: tl.constexpr,
    OFF_KCO: tl.constexpr, OFF_KCR: tl.constexpr, OFF_KS: tl.constexpr, OFF_KGO: tl.constexpr,
    OFF_KGR: tl.constexpr, OFF_KRN: tl.constexpr, OFF_VCO: tl.constexpr, OFF_VCR: tl.constexpr,
    OFF_VGO: tl.constexpr, OFF_VGR: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    if tile >= tl.load(CU_TILES + num_seqs):
        return  # the grid is a static upper bound on the number of tiles
    b = _find_seq(CU_TILES, tile, num_seqs)
    first_key = tl.load(CU_KEYS + b)
    i = (tile - tl.load(CU_TILES + b)) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = i < tl.load(CU_KEYS + b + 1) - first_key
    pos = tl.load(STARTS + b) + i
    phys = tl.load(BLOCK_TABLE + b * stride_bt + pos // BS, mask=tok_mask, other=0)
    head_base = CACHE + phys.to(tl.int64) * page_bytes + h * head_stride
    slot = pos % BS

    # Each tensor is decoded once, then taken back to the original channels OUT_SPLIT column
    # blocks at a time (2 where one [D, D] matrix per dot does not fit shared memory: head_dim
    # 256 on 99 KB GPUs) and stored; K is stored before V is decoded (fewer live registers).
    ent = pos.to(tl.int64)
    ex = pos < 0  # no exact copies
    if HAS_RECENT:
        seq_len = tl.load(SEQ_LENS + b)
        ring, exact_lo = _ring(ST_ROW, b, st_rows, seq_len, st_window)
        ent, ex = _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, ring, h, exact_lo,
                                st_window, HKV, BS, OFF_KGO, OFF_KGR)
    rows = ((first_key + i).to(tl.int64) * HKV + h)[:, None] * D

    k_scale, k_rho = _scales(head_base, slot, tok_mask, OFF_KGO, OFF_KGR)
    k0 = _chunk(head_base, slot, tok_mask, k_rho, CB, TAB, 0, OFF_KCO, OFF_KCR, D, DC, N_O, KBO,
                KBR, U, USE_ASM)
    k1 = k0
    if DC < D:
        k1 = _chunk(head_base, slot, tok_mask, k_rho, CB, TAB, 1, OFF_KCO, OFF_KCR, D, DC, N_O,
                    KBO, KBR, U, USE_ASM)
    s0 = k0
    s1 = k1
    rnorm = k_scale
    if HAS_QJL:
        s0 = _sign_chunk(head_base, slot, tok_mask, CB, TAB, 0, OFF_KS, D, DC, U, USE_ASM)
        s1 = s0
        if DC < D:
            s1 = _sign_chunk(head_base, slot, tok_mask, CB, TAB, 1, OFF_KS, D, DC, U, USE_ASM)
        rnorm = _norm16(head_base, slot, tok_mask, OFF_KRN).to(tl.float32)
    for o in tl.static_range(OUT_SPLIT):
        k = _back(k0, k1, K_BACK, h, o, D, DC, D // OUT_SPLIT) * k_scale[:, None]
        if HAS_QJL:
            k += _back(s0, s1, QJL_BACK, h, o, D, DC, D // OUT_SPLIT) * rnorm[:, None]
        _store_block(k, ST_K, ent, ex, K_BACK, K_MEAN, OUT_K, rows, tok_mask, h, o, D, DC,
                     D // OUT_SPLIT, U, HAS_RECENT)

    v_scale, v_rho = _scales(head_base, slot, tok_mask, OFF_VGO, OFF_VGR)
    v0 = _chunk(head_base, slot, tok_mask, v_rho, CB + 32, TAB + 8, 0, OFF_VCO, OFF_VCR, D, DC,
                N_O, VBO, VBR, U, USE_ASM)
    v1 = v0
    if DC < D:
        v1 = _chunk(head_base, slot, tok_mask, v_rho, CB + 32, TAB + 8, 1, OFF_VCO, OFF_VCR, D,
                    DC, N_O, VBO, VBR, U, USE_ASM)
    for o in tl.static_range(OUT_SPLIT):
        v = _back(v0, v1, V_BACK, h, o, D, DC, D // OUT_SPLIT) * v_scale[:, None]
        _store_block(v, ST_V, ent, ex, V_BACK, V_MEAN, OUT_V, rows, tok_mask, h, o, D, DC,
                     D // OUT_SPLIT, U, HAS_RECENT)
