"""How a decoded K/V tile reaches the mma: SASS of a probe loop compiled for sm_90, no GPU needed.

    python bench/mma_layout_probe.py

The probe loop reads 64-token tiles of 3-bit bit-plane codes (128 channels = 4 words of 32 per
token), decodes them with the PTX look-ups of kernels/lut_unpack.py and feeds one tl.dot, as the
attention kernel's main loop does (one warp). Variants:
- `words in registers` (the kernel as it is): each lane decodes whole words of its tokens and
  Triton moves the tile into the dot's operand layout through shared memory;
- `lane t decodes word t`: the token's 4 words are loaded as a [64, 4] tensor contiguous along t,
  so Triton gives it 8 x 4 threads, and the 32 values of word t are permuted into the columns
  16·kb + 4t + j that lane t owns in the kWidth-4 operand layout: the conversion is a renaming;
- `... as V`: the same tile as the A operand of vᵀ·p (pairs along tokens: through shared memory).
Prints each variant's registers and the SASS opcode mix of its loop (docs/kernel_decode.md).
"""
from __future__ import annotations

import collections
import re

import torch
import triton
import triton.language as tl

from vllm_turboquant.kernels.lut_unpack import _lookup, _tree, decode_word
from vllm_turboquant.kernels.offline_compile import compile_variant, resources, sass_mix

# 48 bytes of planes + norms per token: rows are only 4-byte aligned, as in real pages.
TOKEN_BYTES = tl.constexpr(52)


@triton.jit
def _lane_words(rows, TAB, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 128] fp16: lane t of each token row decodes word t; columns 16·kb + 4t + j."""
    t = tl.arange(0, 4)[None, :]
    ptr = rows.to(tl.pointer_type(tl.int32))[:, None] + t
    p0 = tl.load(ptr)
    p1 = tl.load(ptr + 4)
    p2 = tl.load(ptr + 8)
    tab = TAB + t * 4  # per-lane table copies: uniform ones are re-copied before every PRMT
    o = _lookup(p0, p1, p2, p2, tl.load(tab), tl.load(tab + 1), tl.load(tab + 2),
                tl.load(tab + 3), 3, 32)
    x = _tree(o, 0, 1, 32)  # [N, t, b4, b3, b2, b1, b0] (position bits of the word)
    return tl.reshape(tl.permute(x, (0, 2, 3, 4, 1, 5, 6)), [BLOCK_N, 128])


@triton.jit
def _word_tiles(rows, ok, TAB, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 128] fp16 as the attention kernel builds it: whole words per token, stacked."""
    w01 = tl.join(decode_word(rows, ok, TAB, TAB, 128, 0, 32, 3, True),
                  decode_word(rows, ok, TAB, TAB, 128, 1, 32, 3, True))
    w23 = tl.join(decode_word(rows, ok, TAB, TAB, 128, 2, 32, 3, True),
                  decode_word(rows, ok, TAB, TAB, 128, 3, 32, 3, True))
    return tl.reshape(tl.permute(tl.join(w01, w23), (0, 2, 3, 1)), [BLOCK_N, 128])


@triton.jit
def probe_kernel(CACHE, TAB, Q, OUT, n_tiles, BLOCK_N: tl.constexpr, LANES: tl.constexpr,
                 AS_V: tl.constexpr):
    pid = tl.program_id(0)
    q = tl.load(Q + tl.arange(0, 128)[:, None] * 8 + tl.arange(0, 8)[None, :])
    p = tl.load(Q + tl.arange(0, BLOCK_N)[:, None] * 8 + tl.arange(0, 8)[None, :])
    s = tl.zeros([BLOCK_N, 8], dtype=tl.float32)
    acc = tl.zeros([128, 8], dtype=tl.float32)
    for i in tl.range(0, n_tiles):
        tok = (pid * n_tiles + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = CACHE + tok.to(tl.int64) * TOKEN_BYTES
        if LANES:
            x = _lane_words(rows, TAB, BLOCK_N)
        else:
            x = _word_tiles(rows, tok >= 0, TAB, BLOCK_N)
        if AS_V:
            acc += tl.dot(tl.trans(x), p)
        else:
            s += tl.dot(x, q)
    out = OUT + pid * 2048
    tl.store(out + tl.arange(0, BLOCK_N)[:, None] * 8 + tl.arange(0, 8)[None, :], s)
    tl.store(out + 1024 + tl.arange(0, 128)[:, None] * 8 + tl.arange(0, 8)[None, :], acc)


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts of the loop holding the HMMAs (from the label before the first HMMA to the
    branch after the last)."""
    lines = sass.splitlines()
    hmma = [i for i, line in enumerate(lines) if "HMMA" in line]
    lo = max(i for i in range(hmma[0]) if lines[i].startswith(".L"))
    hi = next(i for i in range(hmma[-1], len(lines)) if "BRA" in lines[i])
    op = r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)"
    return collections.Counter(re.findall(op, "\n".join(lines[lo:hi + 1]), re.M))


def main() -> None:
    args = (torch.empty(8, dtype=torch.uint8), torch.empty(16, dtype=torch.int32),
            torch.empty(8, dtype=torch.float16), torch.empty(8, dtype=torch.float32), 8)
    for name, lanes, as_v in (("words in registers, K", 0, 0), ("lane t decodes word t, K", 1, 0),
                              ("words in registers, as V", 0, 1),
                              ("lane t decodes word t, as V", 1, 1)):
        const = dict(BLOCK_N=64, LANES=lanes, AS_V=as_v)
        compiled = compile_variant(probe_kernel, args + tuple(const.values()),
                                   dict(const, num_warps=1, num_stages=2))
        cubin = compiled.asm["cubin"]
        mix = loop_mix(sass_mix(cubin)[1])
        top = ", ".join(f"{k} {v}" for k, v in mix.most_common(12))
        print(f"{name}: {resources(cubin).get('REG')} registers | loop {sum(mix.values())} SASS: "
              f"{top}", flush=True)


if __name__ == "__main__":
    main()
