"""Triton paged attention straight from TurboQuant pages (byte layout: codec/layout.py).

One program per (query tile, KV head, split of the context). A query tile is up to BLOCK_Q query
tokens of one sequence; its rows (token × GQA head) are the M dimension of every tl.dot, so decode
(BLOCK_Q = 1: the GQA group, padded to 16 rows), chunked prefill, prefix hits and speculative tokens
run the same loop. Each row has its own causal length (and sliding-window start).

Per tile of BLOCK_N cached tokens (spanning BLOCK_N / BS pages, gathered through the block table):
bit planes are loaded as 32-bit words (16-bit at head_dim 64) and unpacked in registers to codes,
codes index a 2^b-entry fp16 centroid table (L1-resident), and the per-token norms are applied to
the scores (keys) and to the probabilities (values) rather than to every element. The QJL term is a
tl.dot of S·q with the ±1 sign tile. Softmax is online (base 2); values accumulate in their rotated
domain. Each split writes (max, sum, unnormalised accumulator); paged_attention.py merges the
splits and rotates back once.
"""
import triton
import triton.language as tl


@triton.jit
def _codes(row_ptr, tok_mask, N: tl.constexpr, NW_PAD: tl.constexpr, U: tl.constexpr,
           BITS: tl.constexpr):
    """int32 codes [BLOCK_N, NW_PAD·U] of one channel group. Each token's row (row_ptr) holds BITS
    bit planes of N/8 bytes; a plane is read as N/U words of U bits (channel c = bit c%U of word c/U)."""
    w = tl.arange(0, NW_PAD)
    j = tl.arange(0, U)
    mask = tok_mask[:, None] & (w < N // U)[None, :]
    code = tl.zeros([row_ptr.shape[0], NW_PAD, U], dtype=tl.int32)
    for k in tl.static_range(BITS):
        if U == 32:
            plane = (row_ptr + k * (N // 8)).to(tl.pointer_type(tl.int32))
            word = tl.load(plane[:, None] + w[None, :], mask=mask, other=0)
        else:
            plane = (row_ptr + k * (N // 8)).to(tl.pointer_type(tl.int16))
            word = tl.load(plane[:, None] + w[None, :], mask=mask, other=0).to(tl.int32)
        code |= ((word[:, :, None] >> j[None, None, :]) & 1) << k
    return tl.reshape(code, [row_ptr.shape[0], NW_PAD * U])


@triton.jit
def _centroids(head_base, slot, tok_mask, CB, OFF: tl.constexpr, N: tl.constexpr,
               NW_PAD: tl.constexpr, U: tl.constexpr, BITS: tl.constexpr):
    """fp16 centroids [BLOCK_N, NW_PAD·U] of one channel group (channels ≥ N are junk; the padded
    query/output lanes they meet are zero/dropped)."""
    code = _codes(head_base + OFF + slot * (BITS * (N // 8)), tok_mask, N, NW_PAD, U, BITS)
    return tl.load(CB + code)


@triton.jit
def _norm16(head_base, slot, tok_mask, OFF: tl.constexpr):
    return tl.load((head_base + OFF).to(tl.pointer_type(tl.float16)) + slot, mask=tok_mask,
                   other=0.0)


@triton.jit
def _staged(ST, idx, ok, n, N: tl.constexpr, OFF: tl.constexpr, D: tl.constexpr):
    """Exact fp16 rows [BLOCK_N, len(n)] of channels OFF + n (n < N) of the staged entries idx."""
    return tl.load(ST + idx[:, None] * D + OFF + n[None, :], mask=ok[:, None] & (n < N)[None, :],
                   other=0.0)


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
def _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, b, h, exact_lo, st_window,
                  HKV: tl.constexpr, BS: tl.constexpr, OFF_KGO: tl.constexpr,
                  OFF_KGR: tl.constexpr):
    """(entry index, has-exact-copy mask) [BLOCK_N]: an entry is this token's exact copy only if it
    was written for this slot with the key norms the page holds now (checksum: their fp16 bits)."""
    slot = pos % BS
    ent = ((b * st_window + pos % st_window) * HKV + h).to(tl.int64)
    ex = tok_mask & (pos >= exact_lo)
    tag_slot = tl.load(ST_TAG + ent * 2, mask=ex, other=-1)
    tag_sum = tl.load(ST_TAG + ent * 2 + 1, mask=ex, other=0)
    g_o = _norm16(head_base, slot, ex, OFF_KGO).to(tl.int16, bitcast=True).to(tl.int32)
    g_r = _norm16(head_base, slot, ex, OFF_KGR).to(tl.int16, bitcast=True).to(tl.int32)
    chk = (g_o & 0xFFFF) | (g_r << 16)
    return ent, ex & (tag_slot == phys * BS + slot) & (tag_sum == chk)


@triton.jit
def _online_softmax(s, visible, m_i, l_i, scale_log2e):
    """Scores [M, N] of one tile into the running max/sum → (p, alpha, m_new, l_new)."""
    s = tl.where(visible, s * scale_log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _tile(start, b, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc_o, acc_r, q_o, q_r, sq,
          CACHE, BLOCK_TABLE, CB_KO, CB_KR, CB_VO, CB_VR, ST_K, ST_V, ST_TAG,
          scale_log2e, stride_bt, page_bytes, head_stride, st_window,
          HKV: tl.constexpr, D: tl.constexpr, N_O: tl.constexpr, N_R: tl.constexpr,
          NW_O: tl.constexpr, NW_R: tl.constexpr, U: tl.constexpr, BS: tl.constexpr,
          BLOCK_N: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr, VBO: tl.constexpr,
          VBR: tl.constexpr, HAS_QJL: tl.constexpr, RECENT: tl.constexpr, EXACT: tl.constexpr,
          OFF_KCO: tl.constexpr, OFF_KCR: tl.constexpr, OFF_KS: tl.constexpr,
          OFF_KGO: tl.constexpr, OFF_KGR: tl.constexpr, OFF_KRN: tl.constexpr,
          OFF_VCO: tl.constexpr, OFF_VCR: tl.constexpr, OFF_VGO: tl.constexpr,
          OFF_VGR: tl.constexpr):
    """One tile of BLOCK_N cached tokens into the online softmax. RECENT (the sequence's newest
    tiles): a pass over the compressed tokens that have no exact copy (EXACT=False), or over the
    exact copies alone (EXACT=True). Two light passes keep the hot loop's registers unspilled."""
    pos = start + tl.arange(0, BLOCK_N)
    # Never touch positions before the window: vLLM may have freed (and reused) those pages.
    tok_mask = (pos < hi) & (pos >= lo)
    phys = tl.load(BLOCK_TABLE + b * stride_bt + pos // BS, mask=tok_mask, other=0)
    head_base = CACHE + phys.to(tl.int64) * page_bytes + h * head_stride  # [BLOCK_N] pointers
    slot = pos % BS
    visible = (pos[None, :] < row_len[:, None]) & (pos[None, :] >= row_lo[:, None]) & \
        tok_mask[None, :]
    if RECENT:
        ent, ex = _exact_copies(ST_TAG, head_base, phys, pos, tok_mask, b, h, exact_lo, st_window,
                                HKV, BS, OFF_KGO, OFF_KGR)
        if EXACT:
            visible = visible & ex[None, :]
        else:
            visible = visible & (ex == 0)[None, :]

    if EXACT:
        n_o = tl.arange(0, NW_O * U)
        n_r = tl.arange(0, NW_R * U)
        s = tl.dot(q_o, tl.trans(_staged(ST_K, ent, ex, n_o, N_O, 0, D)))
        s += tl.dot(q_r, tl.trans(_staged(ST_K, ent, ex, n_r, N_R, N_O, D)))
        p, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i, scale_log2e)
        p16 = p.to(tl.float16)
        acc_o = acc_o * alpha[:, None] + tl.dot(p16, _staged(ST_V, ent, ex, n_o, N_O, 0, D))
        acc_r = acc_r * alpha[:, None] + tl.dot(p16, _staged(ST_V, ent, ex, n_r, N_R, N_O, D))
    else:
        k_o = _centroids(head_base, slot, tok_mask, CB_KO, OFF_KCO, N_O, NW_O, U, KBO)
        s = tl.dot(q_o, tl.trans(k_o)) * _norm16(head_base, slot, tok_mask, OFF_KGO).to(tl.float32)[None, :]
        k_r = _centroids(head_base, slot, tok_mask, CB_KR, OFF_KCR, N_R, NW_R, U, KBR)
        s += tl.dot(q_r, tl.trans(k_r)) * _norm16(head_base, slot, tok_mask, OFF_KGR).to(tl.float32)[None, :]
        if HAS_QJL:
            bits = _codes(head_base + OFF_KS + slot * (D // 8), tok_mask, D, D // U, U, 1)
            signs = tl.where(bits != 0, 1.0, -1.0).to(tl.float16)
            rnorm = _norm16(head_base, slot, tok_mask, OFF_KRN).to(tl.float32)
            s += tl.dot(sq, tl.trans(signs)) * rnorm[None, :]
        p, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i, scale_log2e)
        v_o = _centroids(head_base, slot, tok_mask, CB_VO, OFF_VCO, N_O, NW_O, U, VBO)
        p_o = (p * _norm16(head_base, slot, tok_mask, OFF_VGO).to(tl.float32)[None, :]).to(tl.float16)
        acc_o = acc_o * alpha[:, None] + tl.dot(p_o, v_o)
        v_r = _centroids(head_base, slot, tok_mask, CB_VR, OFF_VCR, N_R, NW_R, U, VBR)
        p_r = (p * _norm16(head_base, slot, tok_mask, OFF_VGR).to(tl.float32)[None, :]).to(tl.float16)
        acc_r = acc_r * alpha[:, None] + tl.dot(p_r, v_r)
    return m_i, l_i, acc_o, acc_r


# Runtime sizes must not specialise the kernel: a new batch size mid-serving would recompile.
@triton.jit(do_not_specialize=["stride_bt", "tokens_per_split", "part_stride", "num_seqs",
                              "window", "st_rows", "st_window"])
def tq_attention_kernel(
    Q_O, Q_R, SQ, CACHE, BLOCK_TABLE, SEQ_LENS, QUERY_START, CU_TILES,
    CB_KO, CB_KR, CB_VO, CB_VR, PART_M, PART_L, PART_O, PART_R, ST_K, ST_V, ST_TAG,
    scale_log2e, stride_bt, page_bytes, head_stride, tokens_per_split, part_stride, num_seqs, window,
    st_rows, st_window,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, N_O: tl.constexpr,
    N_R: tl.constexpr, NW_O: tl.constexpr, NW_R: tl.constexpr,  # words per plane, padded to 2^k
    U: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr,
    VBO: tl.constexpr, VBR: tl.constexpr, HAS_QJL: tl.constexpr, HAS_RECENT: tl.constexpr,
    TAIL: tl.constexpr,
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
    q_end = tl.load(QUERY_START + b + 1)
    q_first = tl.load(QUERY_START + b) + (tile - tl.load(CU_TILES + b)) * BLOCK_Q
    seq_len = tl.load(SEQ_LENS + b)

    # Rows: query token q_first + m // G_P2, query head h·G + m % G_P2.
    m = tl.arange(0, BLOCK_M)
    t = q_first + m // G_P2
    g = m % G_P2
    row_ok = (m // G_P2 < BLOCK_Q) & (g < G) & (t < q_end)
    row = t * HQ + h * G + g
    row_len = tl.where(row_ok, seq_len - (q_end - 1 - t), 0)   # keys this row may see (causal)
    row_lo = tl.maximum(row_len - window, 0)                   # window: 2^30 when there is none

    n_o = tl.arange(0, NW_O * U)
    n_r = tl.arange(0, NW_R * U)
    q_o = tl.load(Q_O + row[:, None] * (NW_O * U) + n_o[None, :], mask=row_ok[:, None], other=0.0)
    q_r = tl.load(Q_R + row[:, None] * (NW_R * U) + n_r[None, :], mask=row_ok[:, None], other=0.0)
    q_o = q_o.to(tl.float16)
    q_r = q_r.to(tl.float16)
    sq = q_o  # unused without QJL keys
    if HAS_QJL:
        cd = tl.arange(0, D)
        sq = tl.load(SQ + row[:, None] * D + cd[None, :], mask=row_ok[:, None], other=0.0)
        sq = sq.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, NW_O * U], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M, NW_R * U], dtype=tl.float32)

    # With exact copies (HAS_RECENT), a sequence's newest st_window positions (batch rows <
    # st_rows) are left to a second, TAIL launch of this kernel, which writes one more split.
    # Keeping them out of the main loop keeps its registers unspilled.
    exact_lo = tl.where(b < st_rows, seq_len - st_window, 1 << 30)
    row_min = tl.min(tl.where(row_ok, row_lo, seq_len), 0)
    if TAIL:
        lo = tl.maximum(row_min, exact_lo)
        hi = tl.max(row_len, 0)
        split = part_stride - 1
    else:
        lo = tl.maximum(split * tokens_per_split, row_min)
        hi = tl.minimum(split * tokens_per_split + tokens_per_split, tl.max(row_len, 0))
        if HAS_RECENT:
            hi = tl.minimum(hi, exact_lo)
    first = lo // BLOCK_N * BLOCK_N
    if TAIL:
        for start in tl.range(first, hi, BLOCK_N):
            for exact in tl.static_range(2):  # tokens without an exact copy, then the copies
                m_i, l_i, acc_o, acc_r = _tile(
                    start, b, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc_o, acc_r, q_o,
                    q_r, sq, CACHE, BLOCK_TABLE, CB_KO, CB_KR, CB_VO, CB_VR, ST_K, ST_V, ST_TAG,
                    scale_log2e, stride_bt, page_bytes, head_stride, st_window,
                    HKV, D, N_O, N_R, NW_O, NW_R, U, BS, BLOCK_N, KBO, KBR, VBO, VBR, HAS_QJL,
                    True, exact == 1, OFF_KCO, OFF_KCR, OFF_KS, OFF_KGO, OFF_KGR, OFF_KRN,
                    OFF_VCO, OFF_VCR, OFF_VGO, OFF_VGR)
    else:
        for start in tl.range(first, hi, BLOCK_N):
            m_i, l_i, acc_o, acc_r = _tile(
                start, b, h, lo, hi, row_len, row_lo, exact_lo, m_i, l_i, acc_o, acc_r, q_o, q_r,
                sq, CACHE, BLOCK_TABLE, CB_KO, CB_KR, CB_VO, CB_VR, ST_K, ST_V, ST_TAG,
                scale_log2e, stride_bt, page_bytes, head_stride, st_window,
                HKV, D, N_O, N_R, NW_O, NW_R, U, BS, BLOCK_N, KBO, KBR, VBO, VBR, HAS_QJL, False,
                False, OFF_KCO, OFF_KCR, OFF_KS, OFF_KGO, OFF_KGR, OFF_KRN, OFF_VCO, OFF_VCR,
                OFF_VGO, OFF_VGR)

    part = row * part_stride + split
    tl.store(PART_M + part, m_i, mask=row_ok)
    tl.store(PART_L + part, l_i, mask=row_ok)
    tl.store(PART_O + part[:, None] * (NW_O * U) + n_o[None, :], acc_o, mask=row_ok[:, None])
    tl.store(PART_R + part[:, None] * (NW_R * U) + n_r[None, :], acc_r, mask=row_ok[:, None])
