"""Triton cache write: quantize new K or V vectors and store them into their slots' pages.

One program per (tile of BLOCK_T tokens, KV head, K or V): gather the channel split, rotate each
group with TF32 tl.dots against a hi/lo split of Rᵀ made once on the host (fp32-accurate,
_rotate_group) and subtract the head's rotated mean, bucketize against the Lloyd-Max boundaries,
norm-correct, and for QJL keys project the residual by S and keep its signs and norm; then pack
the bit planes and store every region row at the token's slot (slot -1: skip).
With STAGE, tokens with a ring entry (>= 0) also keep their exact rotated vectors there, and the
key launch tags the entry with (slot, the key norms' bits): see codec/recent.py.
The codec's `LayerKVCodec.write` (and `RecentTokens.write`) are the oracles.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate_group(X, PERM, RT, RMEAN, x_row, h, tok_mask, D: tl.constexpr, START: tl.constexpr,
                  N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
                  X_SPLIT: tl.constexpr):
    """R(x[perm[START:START+N]] - mean): [BLOCK_T, N_PAD] fp32 (zero beyond N); x_row: each
    token's vector's offset in X. RT: Rᵀ [N_PAD, N_PAD] as a TF32 pair (hi, lo: cache_write.
    _tf32_pair), RMEAN: the rotated means [H, N_PAD]. BK input channels at a time, so Triton
    streams Rᵀ's rows through shared memory (cp.async) instead of holding the matrix in registers.
    A 16-bit x is exact in TF32: x·hi + x·lo is fp32-accurate; an fp32 x (X_SPLIT) adds its low
    part times hi."""
    n = tl.arange(0, N_PAD)
    acc = tl.zeros([x_row.shape[0], N_PAD], dtype=tl.float32)
    STEP: tl.constexpr = BK if BK < N_PAD else N_PAD
    for k0 in tl.range(0, N_PAD, STEP):
        k = k0 + tl.arange(0, STEP)
        kmask = k < N
        chan = tl.load(PERM + h * D + START + k, mask=kmask, other=0)
        x = tl.load(X + x_row[:, None] + chan[None, :], mask=tok_mask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        hi = tl.load(RT + k[:, None] * N_PAD + n[None, :])
        lo = tl.load(RT + N_PAD * N_PAD + k[:, None] * N_PAD + n[None, :])
        if X_SPLIT:
            x_hi = _tf32_hi(x)
            acc = tl.dot(x - x_hi, hi, acc, input_precision="tf32")
            x = x_hi
        acc = tl.dot(x, hi, acc, input_precision="tf32")
        acc = tl.dot(x, lo, acc, input_precision="tf32")
    return acc - tl.load(RMEAN + h * N_PAD + n)[None, :]


@triton.jit
def _quantize_group(x_rot, BOUNDS, CENT, N: tl.constexpr, N_PAD: tl.constexpr,
                    BITS: tl.constexpr, NORM_CORRECTION: tl.constexpr):
    """→ (codes int32 [BT, N_PAD], gamma fp32 [BT] rounded through fp16, reconstruction
    [BT, N_PAD]).
    Each code's centroid by a select chain on the boundaries' scalars (Triton moved the pointer
    tensors of a per-element gather between layouts through shared memory; H100, 16,384-token
    3.5_mse write 540 -> 510 us)."""
    norm = tl.sqrt(tl.sum(x_rot * x_rot, 1))
    unit = x_rot / tl.maximum(norm, 1e-30)[:, None]
    code = tl.zeros(x_rot.shape, dtype=tl.int32)
    cent = tl.zeros(x_rot.shape, dtype=tl.float32) + tl.load(CENT)
    for j in tl.static_range((1 << BITS) - 1):
        up = unit > tl.load(BOUNDS + j)  # boundaries ascend: the last one passed picks
        code += up.to(tl.int32)
        cent = tl.where(up, tl.load(CENT + j + 1), cent)
    # Padded lanes (channels N..N_PAD) must not count in the norm correction.
    cent = tl.where((tl.arange(0, N_PAD) < N)[None, :], cent, 0.0)
    if NORM_CORRECTION:
        gamma = norm / tl.sqrt(tl.sum(cent * cent, 1))
    else:
        gamma = norm
    gamma = tl.minimum(gamma, 65504.0).to(tl.float16).to(tl.float32)
    return code, gamma, cent * gamma[:, None]


@triton.jit
def _store_planes(head_base, off, tok_mask, code, OFF: tl.constexpr, N: tl.constexpr,
                  N_PAD: tl.constexpr, BITS: tl.constexpr, byte0=0):
    """b-bit codes [BT, N_PAD] of N channels as BITS planes of N / 8 bytes per token; the codes
    may be a slice of the plane starting at byte byte0 (then N_PAD counts the slice)."""
    j = tl.arange(0, N_PAD // 8)
    shifts = tl.arange(0, 8)
    mask = tok_mask[:, None] & (byte0 + j < N // 8)[None, :]
    grouped = tl.reshape(code, [code.shape[0], N_PAD // 8, 8])
    row = head_base + OFF + off * (BITS * (N // 8)) + byte0
    for k in tl.static_range(BITS):
        byte = tl.sum(((grouped >> k) & 1) << shifts[None, None, :], 2)
        tl.store(row[:, None] + k * (N // 8) + j[None, :], byte.to(tl.uint8), mask=mask)


@triton.jit
def _tf32_hi(x):
    """x with its low 13 mantissa bits cleared: exact in TF32, and x - hi is TF32-exact to 2^-22."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _store_signs(head_base, off, tok_mask, res_o, res_r, S_O, S_R, D: tl.constexpr,
                 N_O: tl.constexpr, N_R_PAD: tl.constexpr, BK: tl.constexpr, OFF_S: tl.constexpr):
    """QJL sign bits of S·r (r = (res_o, res_r) [BT, N_O + N_R_PAD], S [D, d]) at OFF_S.
    S_O / S_R: Sᵀ's rows of each group as TF32 pairs [2, N, D] (cache_write._tf32_pair). BK
    projections per loop step, so Sᵀ streams through shared memory: the whole fp32 matrix with
    tf32x3 (split in the kernel, per 16 tokens) held 255 registers and 472 B of stack. Three TF32
    dots (r_hi·S_hi + r_lo·S_hi + r_hi·S_lo) are as accurate as tf32x3."""
    ro_hi = _tf32_hi(res_o)
    ro_lo = res_o - ro_hi
    rr_hi = _tf32_hi(res_r)
    rr_lo = res_r - rr_hi
    k_o = tl.arange(0, N_O)
    k_r = tl.arange(0, N_R_PAD)
    STEP: tl.constexpr = BK if BK < D else D
    for d0 in tl.range(0, D, STEP):
        dd = d0 + tl.arange(0, STEP)
        so = S_O + k_o[:, None] * D + dd[None, :]
        sr = S_R + k_r[:, None] * D + dd[None, :]
        so_hi = tl.load(so)
        so_lo = tl.load(so + N_O * D)
        sr_hi = tl.load(sr)
        sr_lo = tl.load(sr + N_R_PAD * D)
        proj = tl.dot(ro_hi, so_hi, input_precision="tf32")
        proj = tl.dot(ro_lo, so_hi, proj, input_precision="tf32")
        proj = tl.dot(ro_hi, so_lo, proj, input_precision="tf32")
        proj = tl.dot(rr_hi, sr_hi, proj, input_precision="tf32")
        proj = tl.dot(rr_lo, sr_hi, proj, input_precision="tf32")
        proj = tl.dot(rr_hi, sr_lo, proj, input_precision="tf32")
        _store_planes(head_base, off, tok_mask, (proj >= 0).to(tl.int32), OFF_S, D, STEP, 1,
                      d0 // 8)


@triton.jit
def _store_norm(head_base, off, tok_mask, value, OFF: tl.constexpr):
    tl.store((head_base + OFF).to(tl.pointer_type(tl.float16)) + off, value.to(tl.float16),
             mask=tok_mask)


@triton.jit(do_not_specialize=["num_tokens", "stride_k", "stride_v"])  # nor batch sizes
def tq_write_kernel(
    XK, XV, SLOTS, CACHE,
    K_PERM, K_RT_O, K_RT_R, K_M_O, K_M_R, K_B_O, K_B_R, K_C_O, K_C_R, K_S_O, K_S_R,
    V_PERM, V_RT_O, V_RT_R, V_M_O, V_M_R, V_B_O, V_B_R, V_C_O, V_C_R, V_S_O, V_S_R,
    ENTRIES, K_STAGE, V_STAGE, TAG, num_tokens, stride_k, stride_v, page_bytes, head_stride,
    H: tl.constexpr, D: tl.constexpr, N_O: tl.constexpr, N_R: tl.constexpr,
    N_R_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr, HAS_STAGE: tl.constexpr,
    BK: tl.constexpr, X_SPLIT: tl.constexpr,
    K_BO: tl.constexpr, K_BR: tl.constexpr, K_QJL: tl.constexpr, K_NC: tl.constexpr,
    K_OFF_CO: tl.constexpr, K_OFF_CR: tl.constexpr, K_OFF_S: tl.constexpr,
    K_OFF_GO: tl.constexpr, K_OFF_GR: tl.constexpr, K_OFF_RN: tl.constexpr,
    V_BO: tl.constexpr, V_BR: tl.constexpr, V_QJL: tl.constexpr, V_NC: tl.constexpr,
    V_OFF_CO: tl.constexpr, V_OFF_CR: tl.constexpr, V_OFF_S: tl.constexpr,
    V_OFF_GO: tl.constexpr, V_OFF_GR: tl.constexpr, V_OFF_RN: tl.constexpr,
):
    """Grid (token tiles, KV heads, 2): the last axis picks K or V, so one launch writes both
    (two launches cost ~11 us each at a 48-token decode step on the H100: latency, not work)."""
    if tl.program_id(2) == 0:
        _write(XK, SLOTS, CACHE, K_PERM, K_RT_O, K_RT_R, K_M_O, K_M_R, K_B_O, K_B_R, K_C_O,
               K_C_R, K_S_O, K_S_R, ENTRIES, K_STAGE, TAG, num_tokens, stride_k, page_bytes,
               head_stride,
               H, D, N_O, N_R, N_R_PAD, BS, BLOCK_T, K_BO, K_BR, K_QJL, K_NC, K_OFF_CO,
               K_OFF_CR, K_OFF_S, K_OFF_GO, K_OFF_GR, K_OFF_RN, HAS_STAGE, True, BK, X_SPLIT)
    else:
        _write(XV, SLOTS, CACHE, V_PERM, V_RT_O, V_RT_R, V_M_O, V_M_R, V_B_O, V_B_R, V_C_O,
               V_C_R, V_S_O, V_S_R, ENTRIES, V_STAGE, TAG, num_tokens, stride_v, page_bytes,
               head_stride,
               H, D, N_O, N_R, N_R_PAD, BS, BLOCK_T, V_BO, V_BR, V_QJL, V_NC, V_OFF_CO,
               V_OFF_CR, V_OFF_S, V_OFF_GO, V_OFF_GR, V_OFF_RN, HAS_STAGE, False, BK, X_SPLIT)


@triton.jit
def _write(
    X, SLOTS, CACHE, PERM, RT_O, RT_R, M_O, M_R, B_O, B_R, C_O, C_R, S_O, S_R, ENTRIES, STAGE,
    TAG, num_tokens, stride_x, page_bytes, head_stride,
    H: tl.constexpr, D: tl.constexpr, N_O: tl.constexpr, N_R: tl.constexpr,
    N_R_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr, BO: tl.constexpr,
    BR: tl.constexpr, HAS_QJL: tl.constexpr, NORM_CORRECTION: tl.constexpr,
    OFF_CO: tl.constexpr, OFF_CR: tl.constexpr, OFF_S: tl.constexpr, OFF_GO: tl.constexpr,
    OFF_GR: tl.constexpr, OFF_RN: tl.constexpr, HAS_STAGE: tl.constexpr, IS_KEY: tl.constexpr,
    BK: tl.constexpr, X_SPLIT: tl.constexpr,
):
    """One (token tile, KV head) of K or V (X [N, H, D], tokens stride_x apart)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(SLOTS + t, mask=t < num_tokens, other=-1).to(tl.int64)
    tok_mask = slot >= 0
    x_row = t.to(tl.int64) * stride_x + h * D
    head_base = CACHE + (slot // BS) * page_bytes + h * head_stride
    off = slot % BS

    x_o = _rotate_group(X, PERM, RT_O, M_O, x_row, h, tok_mask, D, 0, N_O, N_O, BK, X_SPLIT)
    x_r = _rotate_group(X, PERM, RT_R, M_R, x_row, h, tok_mask, D, N_O, N_R, N_R_PAD, BK,
                        X_SPLIT)
    code_o, gamma_o, rec_o = _quantize_group(x_o, B_O, C_O, N_O, N_O, BO, NORM_CORRECTION)
    code_r, gamma_r, rec_r = _quantize_group(x_r, B_R, C_R, N_R, N_R_PAD, BR, NORM_CORRECTION)
    _store_planes(head_base, off, tok_mask, code_o, OFF_CO, N_O, N_O, BO)
    _store_planes(head_base, off, tok_mask, code_r, OFF_CR, N_R, N_R_PAD, BR)
    _store_norm(head_base, off, tok_mask, gamma_o, OFF_GO)
    _store_norm(head_base, off, tok_mask, gamma_r, OFF_GR)
    if HAS_STAGE:
        entry = tl.load(ENTRIES + t, mask=tok_mask, other=-1)
        staged = tok_mask & (entry >= 0)
        ent = entry.to(tl.int64) * H + h
        c_o = tl.arange(0, N_O)
        c_r = tl.arange(0, N_R_PAD)
        tl.store(STAGE + ent[:, None] * D + c_o[None, :], x_o.to(tl.float16),
                 mask=staged[:, None])
        tl.store(STAGE + ent[:, None] * D + N_O + c_r[None, :], x_r.to(tl.float16),
                 mask=staged[:, None] & (c_r < N_R)[None, :])
        if IS_KEY:
            bits_o = gamma_o.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            bits_r = gamma_r.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
            tl.store(TAG + ent * 2, slot.to(tl.int32), mask=staged)
            tl.store(TAG + ent * 2 + 1, bits_o | bits_r, mask=staged)
    if HAS_QJL:
        res_o = x_o - rec_o
        res_r = x_r - rec_r  # zero in the padded lanes
        _store_signs(head_base, off, tok_mask, res_o, res_r, S_O, S_R, D, N_O, N_R_PAD, BK,
                     OFF_S)
        rnorm = tl.sqrt(tl.sum(res_o * res_o, 1) + tl.sum(res_r * res_r, 1))
        _store_norm(head_base, off, tok_mask, tl.minimum(rnorm, 65504.0), OFF_RN)
