"""Triton merge of the attention kernel's splits (tq_attention.py).

The kernel leaves, per (query row, split), a base-2 running max, a sum of probabilities and an
unnormalised value accumulator in the rotated, tile-ordered domain. One program per (query token,
query head, block of DB channels) combines its splits by log-sum-exp and normalises; it writes the
result head-major ([Hq, T, d]) so the launcher rotates every head back with one batched GEMM.
Optionally it writes the row's log-sum-exp of the scaled scores, q·μ_k included (the pages hold
keys minus their mean), to merge with attention computed elsewhere. Splits are read BLOCK_S at a
time, the maxima in a first pass, so no load waits on the previous chunk's arithmetic. Batch 1 at
32k has 129 splits and only 32 rows: blocks of channels give it 4x the programs (latency, not
bandwidth: 2 MB read). Each block re-reads its row's maxima and sums (one float per split), which
is cheaper than a second launch to share them.
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens", "slots"])
def tq_merge_kernel(
    PART_M, PART_L, PART_O, Q, KEY_MEAN, Y, LSE,
    num_tokens, slots, scale_log2e,
    HQ: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.program_id(2)
    row = t * HQ + h
    cd = blk * DB + tl.arange(0, DB)

    top = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(PART_M + row * slots + s, mask=s < slots,
                                      other=float("-inf")))
    top = tl.max(top, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # nothing seen: every weight is 0
    l_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([DB], dtype=tl.float32)
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < slots
        part = row * slots + s
        w = tl.exp2(tl.load(PART_M + part, mask=ok, other=float("-inf")) - top)
        l_sum += w * tl.load(PART_L + part, mask=ok, other=0.0)
        o = tl.load(PART_O + part[:, None] * D + cd[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    total = tl.sum(l_sum, 0)
    tl.store(Y + (h * num_tokens + t) * D + cd, acc / tl.maximum(total, 1e-30))
    if HAS_LSE and blk == 0:
        ch = tl.arange(0, D)
        q = tl.load(Q + row * D + ch).to(tl.float32)
        q_mu = tl.sum(q * tl.load(KEY_MEAN + h * D + ch), 0)
        lse = tl.where(total > 0, top + tl.log2(tl.maximum(total, 1e-30)) + q_mu * scale_log2e,
                       float("-inf"))
        tl.store(LSE + row, lse)
