"""Registers, spills, shared memory and SASS instruction mix of the decode kernel's variants,
compiled for a GPU on any machine (no GPU needed): check kernel changes before spending device
time on them.

    python bench/compile_report.py [--formats turboquant_3.5_mse,...] [--arch 90] [--sass PREFIX]

Llama-3.1-8B heads (32 query / 8 KV heads, head_dim 128); the PTX look-ups on, as on the GPU.
"""
from __future__ import annotations

import argparse

from vllm_turboquant.kernels.offline_compile import (compile_variant, decode_launches,
                                                     resources, sass_mix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--formats", default="turboquant_3.5_mse,turboquant_3.5")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--exact", type=int, default=64, help="exact copies per sequence (0: none)")
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--sass", help="write each variant's SASS to PREFIX.<format>.<kernel>")
    a = ap.parse_args()
    for fmt in a.formats.split(","):
        for kernel, args, constexprs in decode_launches(fmt, exact=a.exact, swap=not a.no_swap):
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
