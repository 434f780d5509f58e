"""Triton epilogue of the paged attention: merge the splits, rotate back, add the value mean.

The attention kernel (tq_attention.py) leaves, per (query row, split), a base-2 running max, a sum
of probabilities and an unnormalised value accumulator in the rotated, tile-ordered domain. One
program per (BLOCK_T query tokens, query head) combines the splits by log-sum-exp, normalises,
multiplies by the head's back-rotation (which also undoes the tile order and the outlier/regular
channel split) and adds the value mean; optionally it writes the row's log-sum-exp of the scaled
scores, q·μ_k included (the pages hold keys minus their mean), to merge with other attention.
One launch replaces a dozen small PyTorch ops: it matters at small batches and large chunks.
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens", "slots"])
def tq_merge_kernel(
    PART_M, PART_L, PART_O, Q, KEY_MEAN, R_BACK, VALUE_MEAN, OUT, LSE,
    num_tokens, slots, scale_log2e,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_LSE: tl.constexpr,
):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    row = t * HQ + h
    cd = tl.arange(0, D)

    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, D], dtype=tl.float32)
    for s in range(slots):
        part = row * slots + s
        m_s = tl.load(PART_M + part, mask=t_ok, other=float("-inf"))
        l_s = tl.load(PART_L + part, mask=t_ok, other=0.0)
        o_s = tl.load(PART_O + part[:, None] * D + cd[None, :], mask=t_ok[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: weights 0
        a = tl.exp2(m - m_safe)
        b = tl.exp2(m_s - m_safe)
        l = l * a + l_s * b
        acc = acc * a[:, None] + o_s * b[:, None]
        m = m_new
    y = acc / tl.maximum(l, 1e-30)[:, None]

    # Back-rotation of the head's KV head, BLOCK_C output channels at a time (fp32 tiles of
    # d x d would not fit shared memory at d = 256).
    r_base = R_BACK + (h // G) * D * D
    for c0 in tl.static_range(0, D, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        r = tl.load(r_base + cd[:, None] * D + cc[None, :])
        out = tl.dot(y, r, input_precision="ieee") + tl.load(VALUE_MEAN + h * D + cc)[None, :]
        tl.store(OUT + row[:, None] * D + cc[None, :], out, mask=t_ok[:, None])
    if HAS_LSE:
        q = tl.load(Q + row[:, None] * D + cd[None, :], mask=t_ok[:, None], other=0.0)
        q_mu = tl.sum(q.to(tl.float32) * tl.load(KEY_MEAN + h * D + cd)[None, :], 1)
        lse = tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)) + q_mu * scale_log2e,
                       float("-inf"))
        tl.store(LSE + row, lse, mask=t_ok)
