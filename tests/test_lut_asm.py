"""The PTX that decodes bit planes into centroids (kernels/lut_unpack.py), run by a tiny emulator
of the instructions it uses, against the codebook: every bit width, word size and code."""
import re

import pytest
import torch

from vllm_turboquant.codec import lloyd_max_centroids
from vllm_turboquant.codec.packing import pack_bitplanes
from vllm_turboquant.kernels.lut_unpack import _lut_asm, lut_tables, word_order

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = a | (b << 32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Executes the block on one set of 32-bit inputs; returns the 16-bit outputs."""
    regs: dict[str, int] = {f"${n_out + i}": v & M32 for i, v in enumerate(inputs)}

    def val(x: str) -> int:
        x = x.strip()
        return int(x, 0) & M32 if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", x) else regs[x]

    outs: dict[int, int] = {}
    for stmt in asm.replace("\n", " ").split(";"):
        stmt = stmt.strip(" {}")
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        if op == "mov.b32" and args.startswith("{"):
            dst, src = args.rsplit(",", 1)
            lo, hi = (d.strip(" {}$") for d in dst.split(","))
            v = val(src)
            outs[int(lo)], outs[int(hi)] = v & 0xFFFF, v >> 16
            continue
        a = [x.strip() for x in args.split(",")]
        x = [val(t) for t in a[1:]]
        res = {"mov.b32": lambda: x[0], "and.b32": lambda: x[0] & x[1],
               "or.b32": lambda: x[0] | x[1], "xor.b32": lambda: x[0] ^ x[1],
               "not.b32": lambda: ~x[0] & M32, "shl.b32": lambda: (x[0] << x[1]) & M32,
               "shr.b32": lambda: x[0] >> x[1], "prmt.b32": lambda: _prmt(*x)}[op]()
        regs[a[0]] = res & M32
    return [outs[i] for i in range(n_out)]


@pytest.mark.parametrize("unit", [16, 32])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_ptx_lookup_returns_each_channels_centroid_in_word_order(bits, unit):
    gen = torch.Generator().manual_seed(bits * unit)
    cb = lloyd_max_centroids(32, bits)
    asm, cons = _lut_asm(bits, unit)
    assert cons.count("=h") == unit and cons.count("r") == bits + 4
    tables = [int(t) for t in lut_tables(cb, bits)]
    order = word_order(unit)
    for _ in range(8):
        codes = torch.randint(0, 1 << bits, (unit,), generator=gen)
        planes = pack_bitplanes(codes, bits).view(bits, unit // 8)
        words = [int.from_bytes(bytes(p.tolist()), "little") for p in planes]
        got = run_ptx(asm, words + tables, unit)
        want = cb.to(torch.float16)[codes[order]].view(torch.int16).tolist()
        assert [g - (1 << 16) if g >= 1 << 15 else g for g in got] == want


def test_four_bit_tables_need_a_symmetric_codebook():
    cb = lloyd_max_centroids(32, 4).clone()
    cb[0] -= 0.01
    with pytest.raises(ValueError, match="symmetric"):
        lut_tables(cb, 4)
