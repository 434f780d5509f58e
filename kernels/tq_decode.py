"""Triton paged decode attention straight from TurboQuant pages (byte layout: codec/layout.py).

One program per (sequence, KV head, split of the context). The GQA group of query heads is the M
dimension of every tl.dot (padded to 16 rows). K/V tiles are unpacked from their bit planes in
registers (code → centroid × norm, never materialised in global memory), scored against the
pre-rotated query per channel group, the QJL term is a tl.dot of S·q with the ±1 sign tile, softmax
is online (base 2), and values are accumulated in their rotated domain. Each split writes
(max, sum, unnormalised accumulator); `decode_attention.py` merges splits and rotates back once.
"""
import triton
import triton.language as tl


@triton.jit
def _unpack_codes(row_base, tok_mask, N: tl.constexpr, N_PAD: tl.constexpr, BITS: tl.constexpr):
    """[BLOCK_N, N_PAD] int32 codes: each token's region row (at row_base) holds BITS bit planes of
    N/8 bytes. Every byte is loaded once, then expanded to its 8 bits in registers."""
    j = tl.arange(0, N_PAD // 8)
    mask = tok_mask[:, None] & (j < N // 8)[None, :]
    shifts = tl.arange(0, 8)
    code = tl.zeros([row_base.shape[0], N_PAD // 8, 8], dtype=tl.int32)
    for k in tl.static_range(BITS):
        byte = tl.load(row_base[:, None] + k * (N // 8) + j[None, :], mask=mask, other=0)
        code |= ((byte.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1) << k
    return tl.reshape(code, [row_base.shape[0], N_PAD])


@triton.jit
def _dequant(head_base, slot, OFF_CODES: tl.constexpr, OFF_GAMMA: tl.constexpr, BS: tl.constexpr,
             tok_mask, codebook, N: tl.constexpr, N_PAD: tl.constexpr, BITS: tl.constexpr):
    """centroid[code] × gamma for one channel group of a token tile → [BLOCK_N, N_PAD] fp32."""
    code = _unpack_codes(head_base + OFF_CODES + slot * (BITS * (N // 8)), tok_mask, N, N_PAD, BITS)
    mask = tok_mask[:, None] & (tl.arange(0, N_PAD) < N)[None, :]
    centroid = tl.load(codebook + code, mask=mask, other=0.0)  # 2^BITS floats: stays in L1
    gamma = tl.load((head_base + OFF_GAMMA).to(tl.pointer_type(tl.float16)) + slot,
                    mask=tok_mask, other=0.0).to(tl.float32)
    return centroid * gamma[:, None]


@triton.jit
def tq_decode_kernel(
    Q_O, Q_R, SQ, CACHE, BLOCK_TABLE, SEQ_LENS, CB_KO, CB_KR, CB_VO, CB_VR,
    PART_M, PART_L, PART_O, PART_R,
    scale_log2e, stride_bt, page_bytes, head_stride, tokens_per_split,
    HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    N_O: tl.constexpr, N_R: tl.constexpr, N_R_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, KBO: tl.constexpr, KBR: tl.constexpr, VBO: tl.constexpr,
    VBR: tl.constexpr, HAS_QJL: tl.constexpr,
    OFF_KCO: tl.constexpr, OFF_KCR: tl.constexpr, OFF_KS: tl.constexpr, OFF_KGO: tl.constexpr,
    OFF_KGR: tl.constexpr, OFF_KRN: tl.constexpr, OFF_VCO: tl.constexpr, OFF_VCR: tl.constexpr,
    OFF_VGO: tl.constexpr, OFF_VGR: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)

    g = tl.arange(0, G_PAD)
    g_mask = g < G
    row = b * HQ + h * G + g                       # query rows of this KV head's group
    co = tl.arange(0, N_O)
    cr = tl.arange(0, N_R_PAD)
    q_o = tl.load(Q_O + row[:, None] * N_O + co[None, :], mask=g_mask[:, None], other=0.0)
    q_r = tl.load(Q_R + row[:, None] * N_R_PAD + cr[None, :], mask=g_mask[:, None], other=0.0)
    q_o = q_o.to(tl.float16)
    q_r = q_r.to(tl.float16)
    if HAS_QJL:
        cd = tl.arange(0, D)
        sq = tl.load(SQ + row[:, None] * D + cd[None, :], mask=g_mask[:, None], other=0.0)
        sq = sq.to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc_o = tl.zeros([G_PAD, N_O], dtype=tl.float32)
    acc_r = tl.zeros([G_PAD, N_R_PAD], dtype=tl.float32)

    # Each iteration takes BLOCK_N tokens (BLOCK_N / BS pages, gathered through the block table).
    tok = tl.arange(0, BLOCK_N)
    first = split * tokens_per_split
    last = tl.minimum(first + tokens_per_split, seq_len)
    for start in tl.range(first, last, BLOCK_N, num_stages=2):
        pos = start + tok
        tok_mask = pos < last
        phys = tl.load(BLOCK_TABLE + b * stride_bt + pos // BS, mask=tok_mask, other=0)
        head_base = CACHE + phys.to(tl.int64) * page_bytes + h * head_stride  # [BLOCK_N] pointers
        slot = pos % BS

        k_o = _dequant(head_base, slot, OFF_KCO, OFF_KGO, BS, tok_mask, CB_KO, N_O, N_O, KBO)
        k_r = _dequant(head_base, slot, OFF_KCR, OFF_KGR, BS, tok_mask, CB_KR, N_R, N_R_PAD, KBR)
        s = tl.dot(q_o, tl.trans(k_o.to(tl.float16)))
        s += tl.dot(q_r, tl.trans(k_r.to(tl.float16)))
        if HAS_QJL:
            bits = _unpack_codes(head_base + OFF_KS + slot * (D // 8), tok_mask, D, D, 1)
            signs = (bits * 2 - 1).to(tl.float16)
            rnorm = tl.load((head_base + OFF_KRN).to(tl.pointer_type(tl.float16)) + slot,
                            mask=tok_mask, other=0.0).to(tl.float32)
            s += tl.dot(sq, tl.trans(signs)) * rnorm[None, :]
        s = tl.where(tok_mask[None, :], s * scale_log2e, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_o = _dequant(head_base, slot, OFF_VCO, OFF_VGO, BS, tok_mask, CB_VO, N_O, N_O, VBO)
        v_r = _dequant(head_base, slot, OFF_VCR, OFF_VGR, BS, tok_mask, CB_VR, N_R, N_R_PAD, VBR)
        p16 = p.to(tl.float16)
        acc_o = acc_o * alpha[:, None] + tl.dot(p16, v_o.to(tl.float16))
        acc_r = acc_r * alpha[:, None] + tl.dot(p16, v_r.to(tl.float16))
        m_i = m_new

    part = row * SPLITS + split
    tl.store(PART_M + part, m_i, mask=g_mask)
    tl.store(PART_L + part, l_i, mask=g_mask)
    tl.store(PART_O + part[:, None] * N_O + co[None, :], acc_o, mask=g_mask[:, None])
    tl.store(PART_R + part[:, None] * N_R_PAD + cr[None, :], acc_r, mask=g_mask[:, None])
