"""Triton paged attention straight from TurboQuant pages (byte layout: codec/layout.py).

One program per (query tile, KV head, split of the context). A query tile is up to BLOCK_Q query
tokens of one sequence; its rows (token × GQA head) are the M dimension of every tl.dot, so decode
(BLOCK_Q = 1: the GQA group, padded to 16 rows), chunked prefill, prefix hits and speculative tokens
run the same loop. Each row has its own causal length (and sliding-window start). Decode tiles
(at most 8 rows) run transposed (SWAP): scoresᵀ = k · qᵀ and accᵀ = vᵀ · pᵀ put the rows in the
mma's N dimension, padded to 8 instead of 16, which halves the accumulator, the mma count and the
softmax work of a GQA group of 4 (255 → 168 registers per thread on an H100).

Per tile of BLOCK_N cached tokens (spanning BLOCK_N / BS pages, gathered through the block table):
bit planes are loaded as 32-bit words (16-bit at head_dim 64) and decoded in registers to fp16
centroids by byte-permute look-ups (lut_unpack.py); the words of K (and of V) are stacked into
[BLOCK_N, DC] tiles, one per channel chunk of DC = d or d/2 channels (one tl.dot each;
paged_attention.channel_chunks), whose channel order ("tile order", paged_attention.tile_order)
queries and value outputs are given in. Per-token norms scale the scores (keys) and the
probabilities (values) rather than every element; the outlier words carry γ_o/γ_r, so one tl.dot
covers both channel groups. The QJL term is a tl.dot of S·q with the ±1 sign tile. Softmax is
online (base 2); values accumulate in their rotated domain. Each split writes (max, sum, unnormalised accumulator);
paged_attention.py merges the splits and rotates back once.
"""
import triton
import triton.language as tl

from .lut_unpack import decode_word, word_channel


@triton.jit
def _norm16(head_base, slot, tok_mask, OFF: tl.constexpr):
    return tl.load((head_base + OFF).to(tl.pointer_type(tl.float16)) + slot, mask=tok_mask,
                   other=0.0)


@triton.jit
def _staged(ST, idx, ok, cols, D: tl.constexpr):
    """Exact fp16 rows [BLOCK_N, len(cols)]: channels `cols` of the staged entries idx."""
    return tl.load(ST + idx[:, None] * D + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _find_seq(CU_TILES, tile, num_seqs):
    """Largest b with CU_TILES[b] <= tile (binary search; CU_TILES has num_seqs + 1 entries)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(CU_TILES + mid) <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, ring, h, exact_lo, st_window,
                  HKV: tl.constexpr, BS: tl.constexpr, OFF_KGO: tl.constexpr,
                  OFF_KGR: tl.constexpr):
    """(entry index, has-exact-copy mask) [BLOCK_N] in the sequence's ring: an entry is this
    token's exact copy only if it was written for this slot with the key norms the page holds now
    (checksum: their fp16 bits)."""
    slot = pos % BS
    ent = ((ring * st_window + pos % st_window) * HKV + h).to(tl.int64)
    ex = tok_mask & (pos >= exact_lo)
    tag_slot = tl.load(ST_TAG + ent * 2, mask=ex, other=-1)
    tag_sum = tl.load(ST_TAG + ent * 2 + 1, mask=ex, other=0)
    g_o = _norm16(head_base, slot, ex, OFF_KGO).to(tl.int16, bitcast=True).to(tl.int32)
    g_r = _norm16(head_base, slot, ex, OFF_KGR).to(tl.int16, bitcast=True).to(tl.int32)
    chk = (g_o & 0xFFFF) | (g_r << 16)
    return ent, ex & (tag_slot == phys * BS + slot) & (tag_sum == chk)


@triton.jit
def _ring(ST_ROW, b, st_rows, seq_len, st_window):
    """(ring of batch row b, first position it may hold exactly): -1 and 2^30 without a ring
    (st_rows: the length of ST_ROW, the per-batch-row ring map of codec/recent.py)."""
    ring = tl.load(ST_ROW + b, mask=b < st_rows, other=-1)
    return ring, tl.where(ring >= 0, seq_len - st_window, 1 << 30)


@triton.jit
def _online_softmax(s, visible, m_i, l_i, scale_log2e, SWAP: tl.constexpr):
    """Scores of one tile ([M, N], or [N, M] with SWAP) into the running max/sum of the M query
    rows → (p, alpha, m_new, l_new)."""
    AX: tl.constexpr = 0 if SWAP else 1
    s = tl.where(visible, s * scale_log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, AX))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - _per_row(m_safe, SWAP))
    return p, alpha, m_new, l_i * alpha + tl.sum(p, AX)


# Orientation. By default a tile's scores are [M query rows, N tokens] = q · kᵀ and the
# accumulator is [M, channels]: the query rows are the mma's M dimension, padded to 16. SWAP
# (decode, M <= 8) computes the transposes, scoresᵀ = k · qᵀ and accᵀ = vᵀ · pᵀ, so the query rows
# are the mma's N dimension, padded only to 8: half the accumulator registers, mma instructions
# and softmax work of a GQA group of 4.
@triton.jit
def _per_row(x, SWAP: tl.constexpr):
    """A per-query-row vector [M] broadcast against scores or accumulators."""
    if SWAP:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _per_token(x, SWAP: tl.constexpr):
    """A per-token vector [N] broadcast against scores."""
    if SWAP:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _qk(q, k, SWAP: tl.constexpr):
    """Scores of queries q ([M, DC], or [DC, M] with SWAP) against a key tile k [N, DC]."""
    if SWAP:
        return tl.dot(k, q)
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _pv(p, v, SWAP: tl.constexpr):
    """Probabilities p ([M, N], or [N, M] with SWAP) times a value tile v [N, DC]."""
    if SWAP:
        return tl.dot(tl.trans(v), p)
    else:
        return tl.dot(p, v)


@triton.jit
def _chunk_channels(c: tl.constexpr, DC: tl.constexpr, U: tl.constexpr):
    """Channel of each position P = w·U + q of channel chunk c: word c·DC/U + w's position q
    (lut_unpack order)."""
    P = tl.arange(0, DC)
    return (c * (DC // U) + P // U) * U + word_channel(P % U, U)


@triton.jit
def _tile_position(ch, DC: tl.constexpr, U: tl.constexpr):
    """Tile-order position of channel ch (inverse of _chunk_channels over the chunks)."""
    W: tl.constexpr = DC // U
    word = ch // U
    b = ch % U
    return (word // W) * DC + (word % W) * U + (b % 4) * (U // 4) + b // 4


@triton.jit
def _words(head_base, slot, tok_mask, rho, CB_O, TAB_O, CB_R, TAB_R, w0: tl.constexpr,
           step: tl.constexpr, OFF_O: tl.constexpr, OFF_R: tl.constexpr, N_O: tl.constexpr,
           N_R: tl.constexpr, BITS_O: tl.constexpr, BITS_R: tl.constexpr, NW: tl.constexpr,
           U: tl.constexpr, USE_ASM: tl.constexpr):
    """Decoded words w0 + j·step (j < NW / step) stacked along new minor dims (lowest bit of j
    last): words below N_O / U are outlier words, scaled by rho; the rest regular words."""
    if step >= NW:
        if w0 < N_O // U:
            row = head_base + OFF_O + slot * (BITS_O * N_O // 8)
            x = decode_word(row, tok_mask, CB_O, TAB_O, N_O, w0, U, BITS_O, USE_ASM)
            return x * rho[:, None]
        else:
            row = head_base + OFF_R + slot * (BITS_R * N_R // 8)
            return decode_word(row, tok_mask, CB_R, TAB_R, N_R, w0 - N_O // U, U, BITS_R, USE_ASM)
    else:
        return tl.join(
            _words(head_base, slot, tok_mask, rho, CB_O, TAB_O, CB_R, TAB_R, w0, step * 2, OFF_O,
                   OFF_R, N_O, N_R, BITS_O, BITS_R, NW, U, USE_ASM),
            _words(head_base, slot, tok_mask, rho, CB_O, TAB_O, CB_R, TAB_R, w0 + step, step * 2,
                   OFF_O, OFF_R, N_O, N_R, BITS_O, BITS_R, NW, U, USE_ASM))


@triton.jit
def _scales(head_base, slot, tok_mask, OFF_GO: tl.constexpr, OFF_GR: tl.constexpr):
    """Per-token (scale, rho) of K or V tiles (fp32, fp16 [BLOCK_N]): scale · tile = γ_o·outliers
    ⊕ γ_r·regular (up to fp16 rounding of the outlier factor). The scale is γ_r (γ_o/1024 if that
    is larger) and the outlier words carry rho = γ_o/scale ≤ 1024, so one tl.dot covers both
    groups (a key whose regular part is below 1/1024 of its outliers' gains ≤ 0.1% error)."""
    return _scales_of(_norm16(head_base, slot, tok_mask, OFF_GO),
                      _norm16(head_base, slot, tok_mask, OFF_GR))


@triton.jit
def _scales_of(g_o, g_r):
    """_scales from the norms γ_o, γ_r (fp16 [BLOCK_N])."""
    g_o = g_o.to(tl.float32)
    g_r = g_r.to(tl.float32)
    scale = tl.maximum(g_r, g_o * (1.0 / 1024))
    return scale, (g_o / tl.maximum(scale, 1e-30)).to(tl.float16)  # rho 0 for a zero vector


@triton.jit
def _tile_pages(start, b, lo, hi, h, CACHE, BLOCK_TABLE, stride_bt, page_bytes, head_stride,
                BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the tile of BLOCK_N positions at `start` lives: (pos, tok_mask, physical block,
    [BLOCK_N] pointers to each token's head in its page, slot in the page)."""
    pos = start + tl.arange(0, BLOCK_N)
    # Never touch positions before the window: vLLM may have freed (and reused) those pages.
    tok_mask = (pos < hi) & (pos >= lo)
    phys = tl.load(BLOCK_TABLE + b * stride_bt + pos // BS, mask=tok_mask, other=0)
    head_base = CACHE + phys.to(tl.int64) * page_bytes + h * head_stride
    return pos, tok_mask, phys, head_base, pos % BS


@triton.jit
def _tile_norms(start, b, lo, hi, h, CACHE, BLOCK_TABLE, stride_bt, page_bytes, head_stride,
                BS: tl.constexpr, BLOCK_N: tl.constexpr, OFF_KGO: tl.constexpr,
                OFF_KGR: tl.constexpr, OFF_VGO: tl.constexpr, OFF_VGR: tl.constexpr):
    """fp16 norms [BLOCK_N] of the tile at `start`: K's γ_o, γ_r, V's γ_o, γ_r. The main loop
    loads them one tile ahead: 2-byte loads are not prefetched by Triton's pipeliner (no
    cp.async below 4 bytes), and waiting for them at the top of every tile was the kernel's
    largest stall (ncu, H100: ~17% of warp samples)."""
    _, tok_mask, _, head_base, slot = _tile_pages(start, b, lo, hi, h, CACHE, BLOCK_TABLE,
                                                  stride_bt, page_bytes, head_stride, BS, BLOCK_N)
    return (_norm16(head_base, slot, tok_mask, OFF_KGO),
            _norm16(head_base, slot, tok_mask, OFF_KGR),
            _norm16(head_base, slot, tok_mask, OFF_VGO),
            _norm16(head_base, slot, tok_mask, OFF_VGR))


@triton.jit
def _word_major(x, N: tl.constexpr, DC: tl.constexpr, U: tl.constexpr):
    """Stacked words [N, U, (2,) * log2(NW)] (_words) → tile [N, DC], word-major: position
    w·U + q holds word w's position q. Word-major keeps the fp16 pairs each look-up makes as
    neighbours in the tile; word-minor (as before) interleaved the words, and ptxas re-paired
    every value with a PRMT before the tile's shared-memory store (sm_90 SASS, 3.5_mse: 817 →
    561 PRMT per 64-token tile; H100 16 x 32k 479 → 451 us)."""
    NW: tl.constexpr = DC // U
    if NW == 1:
        return tl.reshape(x, [N, DC])
    elif NW == 2:
        return tl.reshape(tl.permute(x, (0, 2, 1)), [N, DC])
    elif NW == 4:
        return tl.reshape(tl.permute(x, (0, 2, 3, 1)), [N, DC])
    else:
        return tl.reshape(tl.permute(x, (0, 2, 3, 4, 1)), [N, DC])


@triton.jit
def _chunk(head_base, slot, tok_mask, rho, CB, TAB, c: tl.constexpr, OFF_O: tl.constexpr,
           OFF_R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, N_O: tl.constexpr,
           BITS_O: tl.constexpr, BITS_R: tl.constexpr, U: tl.constexpr, USE_ASM: tl.constexpr):
    """Channel chunk c (DC channels: words c·DC/U ...) of K or V of BLOCK_N tokens as one fp16
    tile [BLOCK_N, DC] in tile order, up to the per-token scale (_scales)."""
    x = _words(head_base, slot, tok_mask, rho, CB, TAB, CB + 16, TAB + 4, c * (DC // U), 1,
               OFF_O, OFF_R, N_O, D - N_O, BITS_O, BITS_R, DC // U, U, USE_ASM)
    return _word_major(x, slot.shape[0], DC, U)


@triton.jit
def _sign_chunk(head_base, slot, tok_mask, CB, TAB, c: tl.constexpr, OFF_KS: tl.constexpr,
                D: tl.constexpr, DC: tl.constexpr, U: tl.constexpr, USE_ASM: tl.constexpr):
    """Chunk c of the QJL ±1 sign tile [BLOCK_N, DC] (1-bit regular words, no outliers)."""
    x = _words(head_base, slot, tok_mask, slot, CB, TAB, CB + 64, TAB + 16, c * (DC // U), 1, 0,
               OFF_KS, 0, D, 1, 1, DC // U, U, USE_ASM)
    return _word_major(x, slot.shape[0], DC, U)


@triton.jit
def _tile(start, b, ring, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc0, acc1, q0, q1,
          sq0, sq1, k_go, k_gr, v_go, v_gr,
          CACHE, BLOCK_TABLE, CB, TAB, ST_K, ST_V, ST_TAG,
          scale_log2e, stride_bt, page_bytes, head_stride, st_window,
          HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, N_O: tl.constexpr, U: tl.constexpr,
          BS: tl.constexpr, BLOCK_N: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr,
          VBO: tl.constexpr, VBR: tl.constexpr, HAS_QJL: tl.constexpr, RECENT: tl.constexpr,
          EXACT: tl.constexpr, USE_ASM: tl.constexpr, SWAP: tl.constexpr,
          OFF_KCO: tl.constexpr, OFF_KCR: tl.constexpr, OFF_KS: tl.constexpr,
          OFF_KGO: tl.constexpr, OFF_KGR: tl.constexpr, OFF_KRN: tl.constexpr,
          OFF_VCO: tl.constexpr, OFF_VCR: tl.constexpr, OFF_VGO: tl.constexpr,
          OFF_VGR: tl.constexpr):
    """One tile of BLOCK_N cached tokens into the online softmax: its compressed tokens, less
    those with a valid exact copy where the sequence has a ring (RECENT), or its exact copies
    alone (EXACT).
    Channels come in D / DC chunks (1 or 2): queries q0, q1 and accumulators acc0, acc1 (the second
    unused with one chunk, and dropped from the loop by the compiler).
    CB / TAB: fp16 codebooks / look-up tables of K outliers, K regular, V outliers, V regular and
    the QJL signs (rows of 16 / 4). k_go ... v_gr: the tile's norms, loaded one tile ahead by the
    caller (_tile_norms); unused by EXACT and HAS_QJL, which load them here."""
    pos, tok_mask, phys, head_base, slot = _tile_pages(
        start, b, lo, hi, h, CACHE, BLOCK_TABLE, stride_bt, page_bytes, head_stride, BS, BLOCK_N)
    p_col = _per_token(pos, SWAP)
    visible = (p_col < _per_row(row_len, SWAP)) & (p_col >= _per_row(row_lo, SWAP)) & \
        _per_token(tok_mask, SWAP)
    if EXACT:
        ent, ex = _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, ring, h, exact_lo,
                                st_window, HKV, BS, OFF_KGO, OFF_KGR)
        visible = visible & _per_token(ex, SWAP)
    elif RECENT:
        if start + BLOCK_N > exact_lo:  # only a sequence's newest tiles can have exact copies
            ent, ex = _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, ring, h, exact_lo,
                                    st_window, HKV, BS, OFF_KGO, OFF_KGR)
            visible = visible & _per_token(ex == 0, SWAP)

    TWO: tl.constexpr = DC < D
    if EXACT:  # channel order (contiguous rows): the caller gave q0, q1 in that order too
        c0 = tl.arange(0, DC)
        s = _qk(q0, _staged(ST_K, ent, ex, c0, D), SWAP)
        if TWO:
            c1 = DC + tl.arange(0, DC)
            s += _qk(q1, _staged(ST_K, ent, ex, c1, D), SWAP)
        p, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i, scale_log2e, SWAP)
        p = p.to(tl.float16)
        acc0 = acc0 * _per_row(alpha, SWAP) + _pv(p, _staged(ST_V, ent, ex, c0, D), SWAP)
        if TWO:
            acc1 = acc1 * _per_row(alpha, SWAP) + _pv(p, _staged(ST_V, ent, ex, c1, D), SWAP)
    else:
        if HAS_QJL:  # carrying norms across tiles made the QJL loop spill at 168 registers
            k_scale, k_rho = _scales(head_base, slot, tok_mask, OFF_KGO, OFF_KGR)
        else:
            k_scale, k_rho = _scales_of(k_go, k_gr)
        s = _qk(q0, _chunk(head_base, slot, tok_mask, k_rho, CB, TAB, 0, OFF_KCO, OFF_KCR, D, DC,
                           N_O, KBO, KBR, U, USE_ASM), SWAP)
        if TWO:
            s += _qk(q1, _chunk(head_base, slot, tok_mask, k_rho, CB, TAB, 1, OFF_KCO, OFF_KCR, D,
                                DC, N_O, KBO, KBR, U, USE_ASM), SWAP)
        s = s * _per_token(k_scale, SWAP)
        if HAS_QJL:
            t = _qk(sq0, _sign_chunk(head_base, slot, tok_mask, CB, TAB, 0, OFF_KS, D, DC, U,
                                     USE_ASM), SWAP)
            if TWO:
                t += _qk(sq1, _sign_chunk(head_base, slot, tok_mask, CB, TAB, 1, OFF_KS, D, DC, U,
                                          USE_ASM), SWAP)
            rnorm = _norm16(head_base, slot, tok_mask, OFF_KRN).to(tl.float32)
            s += t * _per_token(rnorm, SWAP)
        p, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i, scale_log2e, SWAP)
        if HAS_QJL:
            v_scale, v_rho = _scales(head_base, slot, tok_mask, OFF_VGO, OFF_VGR)
        else:
            v_scale, v_rho = _scales_of(v_go, v_gr)
        p_v = (p * _per_token(v_scale, SWAP)).to(tl.float16)
        acc0 = acc0 * _per_row(alpha, SWAP) + _pv(p_v, _chunk(
            head_base, slot, tok_mask, v_rho, CB + 32, TAB + 8, 0, OFF_VCO, OFF_VCR, D, DC, N_O,
            VBO, VBR, U, USE_ASM), SWAP)
        if TWO:
            acc1 = acc1 * _per_row(alpha, SWAP) + _pv(p_v, _chunk(
                head_base, slot, tok_mask, v_rho, CB + 32, TAB + 8, 1, OFF_VCO, OFF_VCR, D, DC,
                N_O, VBO, VBR, U, USE_ASM), SWAP)
    return m_i, l_i, acc0, acc1


# Runtime sizes must not specialise the kernel: a new batch size mid-serving would recompile.
@triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_bt", "tokens_per_split",
                              "part_stride", "num_seqs", "window", "st_rows", "st_window"])
def tq_attention_kernel(
    Q, SQ, CACHE, BLOCK_TABLE, SEQ_LENS, QUERY_START, CU_TILES,
    CB, TAB, PART_M, PART_L, PART_O, ST_K, ST_V, ST_TAG, ST_ROW,
    scale_log2e, stride_qt, stride_qh, stride_bt, page_bytes, head_stride, tokens_per_split,
    part_stride, num_seqs, window, st_rows, st_window,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    N_O: tl.constexpr,
    U: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr,
    VBO: tl.constexpr, VBR: tl.constexpr, HAS_QJL: tl.constexpr, HAS_RECENT: tl.constexpr,
    TAIL: tl.constexpr, USE_ASM: tl.constexpr, CONTEXT_ONLY: tl.constexpr, SWAP: tl.constexpr,
    OFF_KCO: tl.constexpr, OFF_KCR: tl.constexpr, OFF_KS: tl.constexpr, OFF_KGO: tl.constexpr,
    OFF_KGR: tl.constexpr, OFF_KRN: tl.constexpr, OFF_VCO: tl.constexpr, OFF_VCR: tl.constexpr,
    OFF_VGO: tl.constexpr, OFF_VGR: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if tile >= tl.load(CU_TILES + num_seqs):
        return  # the grid is a static upper bound on the number of query tiles
    b = _find_seq(CU_TILES, tile, num_seqs)
    q_start = tl.load(QUERY_START + b)
    q_end = tl.load(QUERY_START + b + 1)
    q_first = q_start + (tile - tl.load(CU_TILES + b)) * BLOCK_Q
    seq_len = tl.load(SEQ_LENS + b)

    # Rows: query token q_first + m // G_P2, query head h·G + m % G_P2.
    m = tl.arange(0, BLOCK_M)
    t = q_first + m // G_P2
    g = m % G_P2
    row_ok = (m // G_P2 < BLOCK_Q) & (g < G) & (t < q_end)
    row = t * HQ + h * G + g
    row_len = tl.where(row_ok, seq_len - (q_end - 1 - t), 0)   # keys this row may see (causal)
    row_lo = tl.maximum(row_len - window, 0)                   # window: 2^30 when there is none
    if CONTEXT_ONLY:  # the step's own tokens are attended elsewhere (exact, FlashAttention)
        row_len = tl.minimum(row_len, seq_len - (q_end - q_start))

    # Queries (and S·q) in tile order, one tensor per channel chunk: the launcher permuted them
    # like the decoded tiles (head-major, strided). With one chunk the second ones are unused.
    # With SWAP, queries and accumulators are transposed: [DC, BLOCK_M].
    # The TAIL reads exact copies, whose rows are in channel order: it gathers its queries into
    # that order and scatters its outputs back to tile order (once per program, against a
    # gather of every staged value).
    cd = tl.arange(0, DC)
    pos0 = cd
    pos1 = DC + cd
    if TAIL:
        pos0 = _tile_position(cd, DC, U)
        pos1 = _tile_position(DC + cd, DC, U)
    q_row = _per_row((h * G + g) * stride_qh + t * stride_qt, SWAP)
    q_ok = _per_row(row_ok, SWAP)
    q0 = tl.load(Q + q_row + _per_token(pos0, SWAP), mask=q_ok, other=0.0).to(tl.float16)
    q1 = q0
    if DC < D:
        q1 = tl.load(Q + q_row + _per_token(pos1, SWAP), mask=q_ok, other=0.0).to(tl.float16)
    sq0 = q0
    sq1 = q1
    if HAS_QJL and not TAIL:
        sq0 = tl.load(SQ + q_row + _per_token(cd, SWAP), mask=q_ok, other=0.0).to(tl.float16)
        if DC < D:
            sq1 = tl.load(SQ + DC + q_row + _per_token(cd, SWAP), mask=q_ok,
                          other=0.0).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros(q0.shape, dtype=tl.float32)
    acc1 = tl.zeros(q0.shape, dtype=tl.float32)

    # With exact copies (HAS_RECENT), the main launch skips the tokens of a sequence's newest
    # st_window positions that have a valid exact copy (it checks tags in its newest tiles only),
    # and a second, TAIL launch of this kernel (4 warps) reads those copies into one more split:
    # fp16 rows, no decode, ~5-11 us on the H100 where the former two-pass tail (compressed
    # tokens without a copy, then the copies, one warp, spilling) took 32-47.
    ring = b
    exact_lo = seq_len * 0 + (1 << 30)
    if HAS_RECENT:
        ring, exact_lo = _ring(ST_ROW, b, st_rows, seq_len, st_window)
    row_min = tl.min(tl.where(row_ok, row_lo, seq_len), 0)
    if TAIL:
        lo = tl.maximum(row_min, exact_lo)
        hi = tl.max(row_len, 0)
        split = part_stride - 1
    else:
        lo = tl.maximum(split * tokens_per_split, row_min)
        hi = tl.minimum(split * tokens_per_split + tokens_per_split, tl.max(row_len, 0))
    first = lo // BLOCK_N * BLOCK_N
    z = tl.zeros([BLOCK_N], dtype=tl.float16)  # norms for _tile calls that load their own
    if TAIL:
        for start in tl.range(first, hi, BLOCK_N):
            m_i, l_i, acc0, acc1 = _tile(
                start, b, ring, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc0, acc1,
                q0, q1, sq0, sq1, z, z, z, z, CACHE, BLOCK_TABLE, CB, TAB, ST_K, ST_V, ST_TAG,
                scale_log2e, stride_bt, page_bytes, head_stride, st_window,
                HKV, D, DC, N_O, U, BS, BLOCK_N, KBO, KBR, VBO, VBR, HAS_QJL,
                True, True, USE_ASM, SWAP, OFF_KCO, OFF_KCR, OFF_KS, OFF_KGO, OFF_KGR,
                OFF_KRN, OFF_VCO, OFF_VCR, OFF_VGO, OFF_VGR)
    elif HAS_QJL:
        for start in tl.range(first, hi, BLOCK_N):
            m_i, l_i, acc0, acc1 = _tile(
                start, b, ring, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc0, acc1, q0,
                q1, sq0, sq1, z, z, z, z, CACHE, BLOCK_TABLE, CB, TAB, ST_K, ST_V, ST_TAG,
                scale_log2e, stride_bt, page_bytes, head_stride, st_window,
                HKV, D, DC, N_O, U, BS, BLOCK_N, KBO, KBR, VBO, VBR, True, HAS_RECENT,
                False, USE_ASM, SWAP, OFF_KCO, OFF_KCR, OFF_KS, OFF_KGO, OFF_KGR, OFF_KRN, OFF_VCO,
                OFF_VCR, OFF_VGO, OFF_VGR)
    else:  # each tile's norms are loaded one tile ahead (_tile_norms)
        k_go, k_gr, v_go, v_gr = _tile_norms(
            first, b, lo, hi, h, CACHE, BLOCK_TABLE, stride_bt, page_bytes, head_stride, BS,
            BLOCK_N, OFF_KGO, OFF_KGR, OFF_VGO, OFF_VGR)
        for start in tl.range(first, hi, BLOCK_N):
            n_kgo, n_kgr, n_vgo, n_vgr = _tile_norms(
                start + BLOCK_N, b, lo, hi, h, CACHE, BLOCK_TABLE, stride_bt, page_bytes,
                head_stride, BS, BLOCK_N, OFF_KGO, OFF_KGR, OFF_VGO, OFF_VGR)
            m_i, l_i, acc0, acc1 = _tile(
                start, b, ring, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc0, acc1, q0,
                q1, sq0, sq1, k_go, k_gr, v_go, v_gr, CACHE, BLOCK_TABLE, CB, TAB, ST_K, ST_V,
                ST_TAG, scale_log2e, stride_bt, page_bytes, head_stride, st_window,
                HKV, D, DC, N_O, U, BS, BLOCK_N, KBO, KBR, VBO, VBR, False, HAS_RECENT,
                False, USE_ASM, SWAP, OFF_KCO, OFF_KCR, OFF_KS, OFF_KGO, OFF_KGR, OFF_KRN, OFF_VCO,
                OFF_VCR, OFF_VGO, OFF_VGR)
            k_go, k_gr, v_go, v_gr = n_kgo, n_kgr, n_vgo, n_vgr

    part = row * part_stride + split
    tl.store(PART_M + part, m_i, mask=row_ok)
    tl.store(PART_L + part, l_i, mask=row_ok)
    o_row = PART_O + _per_row(part, SWAP) * D
    tl.store(o_row + _per_token(pos0, SWAP), acc0, mask=q_ok)
    if DC < D:
        tl.store(o_row + _per_token(pos1, SWAP), acc1, mask=q_ok)
