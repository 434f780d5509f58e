"""Registers, spills, shared memory and SASS instruction mix of the decode kernel's variants,
compiled for a GPU on any machine (no GPU needed): check kernel changes before spending device
time on them.

    python bench/compile_report.py [--formats turboquant_3.5_mse,...] [--arch 90] [--sass PREFIX]

Llama-3.1-8B heads (bench/kernel_decode.py's); the PTX look-ups on, as on the GPU.
"""
from __future__ import annotations

import argparse

import torch

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout
from vllm_turboquant.kernels.offline_compile import (capture_launches, compile_variant,
                                                     resources, sass_mix)
from vllm_turboquant.kernels.paged_attention import decode_attention

HQ, HKV, D, BS = 32, 8, 128, 16


def decode_variants(fmt: str, exact: int, **tuning) -> list[tuple]:
    """(kernel, args, constexprs) of each launch of one decode step in format `fmt`."""
    lay = page_layout(fmt, D, BS, HKV)
    codec = LayerKVCodec(lay)
    codec.calibrate(torch.randn(64, HKV, D), torch.randn(64, HKV, D))
    cache = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    lens = torch.tensor([4 * BS], dtype=torch.int32)
    recent = RecentTokens(1, exact, HKV, D, "cpu") if exact else None
    with capture_launches(USE_ASM=True) as seen:
        try:
            decode_attention(codec, torch.randn(1, HQ, D), cache, table, lens, D ** -0.5,
                             recent=recent, **tuning)
        except Exception:  # noqa: BLE001 - the merge reads outputs no launch wrote
            pass
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--formats", default="turboquant_3.5_mse,turboquant_3.5")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--exact", type=int, default=64, help="exact copies per sequence (0: none)")
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--sass", help="write each variant's SASS to PREFIX.<format>.<kernel>")
    a = ap.parse_args()
    for fmt in a.formats.split(","):
        for kernel, args, constexprs in decode_variants(fmt, a.exact, swap=not a.no_swap):
            name = kernel.fn.__name__ + ("_tail" if constexprs.get("TAIL") else "")
            cubin = compile_variant(kernel, args, constexprs, a.arch).asm["cubin"]
            r, (mix, text) = resources(cubin), sass_mix(cubin)
            top = ", ".join(f"{k} {v}" for k, v in mix.most_common(10))
            print(f"{fmt} {name}: {r.get('REG')} registers, {r.get('STACK')} B stack, "
                  f"{r.get('SHARED')} B static shared | {sum(mix.values())} SASS: {top}",
                  flush=True)
            if a.sass:
                with open(f"{a.sass}.{fmt}.{name}", "w") as f:
                    f.write(text)


if __name__ == "__main__":
    main()
