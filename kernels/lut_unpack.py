"""Bit-plane codes → fp16 centroids in registers, for the attention kernel (tq_attention.py).

A channel group's codes are bit planes (codec/packing.py): in a word of U (32, or 16 at head_dim
64) channels, plane k holds bit k of channel b in bit b. On the GPU one PTX block turns a word's
planes into its U centroids in about two instructions per value (the old per-bit shift/mask and a
table load per value took ~15):
- selector: for r = 0..3, nibble i of s_r = the code of channel b = r + 4i (a shift and a lop3 per
  plane: every nibble at once);
- look-up: `prmt` picks 4 bytes of an 8-byte register table, one per selector nibble: once for the
  centroids' low bytes, once for their high bytes; two more `prmt`s interleave them into fp16 pairs;
- 4-bit codes (16 centroids) use the codebook's symmetry c[15 - i] = -c[i]: the low 3 bits, flipped
  when the top bit is 0, index the 8 positive centroids and one more `prmt` ORs in the sign.
Values come out in *word order*: position p = (U/4)·r + i of a word holds channel b = r + 4i, so
each fp16 pair a look-up makes is a pair of neighbouring positions (no repacking). The attention
kernel stacks words into a tile (tq_attention.py) and the launcher permutes queries and value
outputs to that order once, folded into the rotation matrices (paged_attention.tile_order).
Under TRITON_INTERPRET (CPU tests, no PTX) the same values come from shifts and a table load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def word_order(unit: int) -> torch.Tensor:
    """Channel (bit) held by each position of a decoded word (long [unit])."""
    q = torch.arange(unit)
    return q // (unit // 4) + 4 * (q % (unit // 4))


def lut_tables(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [4] = (low bytes of entries 0-3, of 4-7, high bytes of 0-3, of 4-7) of the 8-entry
    fp16 table the PTX looks up: the codebook (zero-padded) for bits <= 3, its positive half
    for 4."""
    c = centroids.to(torch.float16).cpu()
    if bits == 4:
        if not torch.equal(c[8:], -c[:8].flip(0)):
            raise ValueError("4-bit look-ups need a symmetric codebook (c[15 - i] = -c[i])")
        c = c[8:]
    c = torch.cat([c, c.new_zeros(8 - c.numel())])
    b = c.view(torch.int16).to(torch.int64) & 0xFFFF
    lo, hi = b & 0xFF, b >> 8
    shifts = torch.tensor([0, 8, 16, 24])
    words = [(x[i:i + 4] << shifts).sum() for x in (lo, hi) for i in (0, 4)]
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _lut_asm(bits: int, unit: int) -> tuple[str, str]:
    """PTX and constraints: inputs planes p0..p{bits-1} then tables L0 L1 H0 H1 (lut_tables);
    outputs the word's `unit` fp16 values in word order (word_order)."""
    ins = [f"${unit + k}" for k in range(bits)]
    L0, L1, H0, H1 = (f"${unit + bits + i}" for i in range(4))
    lines = [".reg .b32 s, m, t, x, lo, hi, y;"]
    planes = ins[: min(bits, 3)]
    if bits == 4:  # negative codes (top bit 0) index the magnitudes by their complement
        lines.append(".reg .b32 q0, q1, q2;")
        lines += [f"xor.b32 t, {ins[k]}, {ins[3]}; not.b32 q{k}, t;" for k in range(3)]
        planes = ["q0", "q1", "q2"]
    per_r = unit // 4
    for r in range(4):
        for k, p in enumerate(planes):  # bit k of channel r + 4i → bit k of nibble i
            shift = f"shr.b32 x, {p}, {r - k};" if r > k else (
                f"shl.b32 x, {p}, {k - r};" if k > r else f"mov.b32 x, {p};")
            mask = hex(0x11111111 << k)
            lines.append(f"{shift} and.b32 x, x, {mask};" + (" mov.b32 s, x;" if k == 0 else
                                                            " or.b32 s, s, x;"))
        if bits == 4:
            lines.append(f"shr.b32 m, {ins[3]}, {r}; and.b32 m, m, 0x11111111;")
        for h in range(unit // 16):  # nibbles 4h .. 4h + 3
            if h:
                lines.append("shr.b32 s, s, 16;" + (" shr.b32 m, m, 16;" if bits == 4 else ""))
            lines.append(f"prmt.b32 lo, {L0}, {L1}, s; prmt.b32 hi, {H0}, {H1}, s;")
            if bits == 4:  # 0x80 in the high byte of every value whose top code bit is 0
                lines.append("prmt.b32 t, 0x80, 0, m; or.b32 hi, hi, t;")
            for e, ctl in enumerate(("0x5140", "0x7362")):
                p0 = per_r * r + 4 * h + 2 * e
                lines.append(f"prmt.b32 y, lo, hi, {ctl}; mov.b32 {{${p0}, ${p0 + 1}}}, y;")
    asm = "{\n" + "\n".join(lines) + "\n}"
    return asm, ",".join(["=h"] * unit + ["r"] * (bits + 4))


_A1_16, _C1_16 = (tl.constexpr(s) for s in _lut_asm(1, 16))
_A2_16, _C2_16 = (tl.constexpr(s) for s in _lut_asm(2, 16))
_A3_16, _C3_16 = (tl.constexpr(s) for s in _lut_asm(3, 16))
_A4_16, _C4_16 = (tl.constexpr(s) for s in _lut_asm(4, 16))
_A1_32, _C1_32 = (tl.constexpr(s) for s in _lut_asm(1, 32))
_A2_32, _C2_32 = (tl.constexpr(s) for s in _lut_asm(2, 32))
_A3_32, _C3_32 = (tl.constexpr(s) for s in _lut_asm(3, 32))
_A4_32, _C4_32 = (tl.constexpr(s) for s in _lut_asm(4, 32))


@triton.jit
def _tree(o, base: tl.constexpr, step: tl.constexpr, n: tl.constexpr):
    """Stack values o[base + j·step] (j < n / step) along new minor dims, lowest bit of j last."""
    if step * 2 >= n:
        return tl.join(o[base], o[base + step])
    else:
        return tl.join(_tree(o, base, step * 2, n), _tree(o, base + step, step * 2, n))


@triton.jit
def _lookup(p0, p1, p2, p3, t0, t1, t2, t3, BITS: tl.constexpr, U: tl.constexpr):
    """The word's U values (a U-tuple of fp16 [BLOCK_N], word order) from its planes."""
    out: tl.constexpr = (tl.float16, ) * U
    if BITS == 1:
        o = tl.inline_asm_elementwise(_A1_32 if U == 32 else _A1_16, _C1_32 if U == 32 else _C1_16,
                                      [p0, t0, t1, t2, t3], out, True, 1)
    elif BITS == 2:
        o = tl.inline_asm_elementwise(_A2_32 if U == 32 else _A2_16, _C2_32 if U == 32 else _C2_16,
                                      [p0, p1, t0, t1, t2, t3], out, True, 1)
    elif BITS == 3:
        o = tl.inline_asm_elementwise(_A3_32 if U == 32 else _A3_16, _C3_32 if U == 32 else _C3_16,
                                      [p0, p1, p2, t0, t1, t2, t3], out, True, 1)
    else:
        o = tl.inline_asm_elementwise(_A4_32 if U == 32 else _A4_16, _C4_32 if U == 32 else _C4_16,
                                      [p0, p1, p2, p3, t0, t1, t2, t3], out, True, 1)
    return o


@triton.jit
def word_channel(q, U: tl.constexpr):
    """Channel (within its word) of position q < U of a decoded word: see word_order."""
    return q // (U // 4) + 4 * (q % (U // 4))


@triton.jit
def decode_word(row, tok_mask, CB, TAB, N: tl.constexpr, W: tl.constexpr, U: tl.constexpr,
                BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 [BLOCK_N, U] centroids of word W of an N-channel group, positions in word order.
    row: [BLOCK_N] pointers to each token's planes (BITS planes of N/8 bytes); CB: the fp16
    codebook (interpreter path); TAB: its lut_tables (PTX path)."""
    if U == 32:
        ptr = row.to(tl.pointer_type(tl.int32)) + W
    else:
        ptr = row.to(tl.pointer_type(tl.int16)) + W
    WORDS: tl.constexpr = N // U
    p0 = tl.load(ptr, mask=tok_mask, other=0).to(tl.int32)
    p1 = p0
    p2 = p0
    p3 = p0
    if BITS > 1:
        p1 = tl.load(ptr + WORDS, mask=tok_mask, other=0).to(tl.int32)
    if BITS > 2:
        p2 = tl.load(ptr + 2 * WORDS, mask=tok_mask, other=0).to(tl.int32)
    if BITS > 3:
        p3 = tl.load(ptr + 3 * WORDS, mask=tok_mask, other=0).to(tl.int32)
    if USE_ASM:
        o = _lookup(p0, p1, p2, p3, tl.load(TAB), tl.load(TAB + 1), tl.load(TAB + 2),
                    tl.load(TAB + 3), BITS, U)
        return tl.reshape(_tree(o, 0, 1, U), [row.shape[0], U])
    else:
        b = word_channel(tl.arange(0, U), U)[None, :]
        code = (p0[:, None] >> b) & 1
        if BITS > 1:
            code |= ((p1[:, None] >> b) & 1) << 1
        if BITS > 2:
            code |= ((p2[:, None] >> b) & 1) << 2
        if BITS > 3:
            code |= ((p3[:, None] >> b) & 1) << 3
        return tl.load(CB + code)
