"""Compile kernel variants for an NVIDIA GPU on a machine without one (ptxas ships with Triton).

How kernel changes are checked before they spend device time, and how CI (no GPU) checks that the
PTX look-up path still compiles: the variants a launcher would run are captured on CPU tensors
(`capture_launches`; `decode_launches` for one decode step), compiled for the target with `compile_variant`, and their registers, spills
and SASS read back with `resources` / `sass_mix`. bench/compile_report.py prints them.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import launch as launch_mod

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int16: "i16"}


@contextmanager
def capture_launches(**overrides) -> Iterator[list[tuple]]:
    """Inside the block, `VariantLauncher` launches run nothing and are recorded as
    (kernel, positional args, constexprs | overrides), e.g. USE_ASM=True for the GPU path."""
    seen: list[tuple] = []
    original = launch_mod.VariantLauncher.__call__

    def record(self, grid, *args):
        seen.append((self.kernel, args, dict(self.constexprs, **overrides)))

    launch_mod.VariantLauncher.__call__ = record
    try:
        yield seen
    finally:
        launch_mod.VariantLauncher.__call__ = original


def decode_launches(fmt: str, head_dim: int = 128, num_kv_heads: int = 8, group: int = 4,
                    exact: int = 64, **tuning) -> list[tuple]:
    """(kernel, args, constexprs) of each launch of one decode step in format `fmt` (one
    sequence on scratch CPU pages, `exact` newest tokens with copies; PTX look-ups on)."""
    from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout

    from .paged_attention import decode_attention

    bs = 16
    codec = LayerKVCodec(page_layout(fmt, head_dim, bs, num_kv_heads))
    codec.calibrate(torch.randn(16, num_kv_heads, head_dim),
                    torch.randn(16, num_kv_heads, head_dim))
    cache = torch.zeros(4, codec.layout.page_bytes, dtype=torch.uint8)
    recent = RecentTokens(1, exact, num_kv_heads, head_dim, "cpu") if exact else None
    with capture_launches(USE_ASM=True) as seen:
        decode_attention(codec, torch.randn(1, group * num_kv_heads, head_dim), cache,
                         torch.arange(4, dtype=torch.int32).view(1, 4),
                         torch.tensor([4 * bs], dtype=torch.int32), head_dim ** -0.5,
                         recent=recent, **tuning)
    return seen


def compile_variant(kernel, args: tuple, constexprs: dict, arch: int = 90):
    """Triton's compiled kernel of one variant for sm_{arch}; args as the launcher passes them
    (tensors stand for 16-byte aligned pointers of their dtype, ints for 32-bit integers)."""
    constexprs = dict(constexprs)
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages", "maxnreg")
               if k in constexprs}
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        a = args[i]
        if isinstance(a, torch.Tensor):
            sig[p.name] = "*" + _TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if isinstance(a, float) else "i32"
    const = {(i,): constexprs[p.name] for i, p in enumerate(kernel.params) if p.is_constexpr}
    return triton.compile(ASTSource(kernel, sig, const, attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([exe, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """REG (registers per thread), STACK (bytes of local memory: spills), SHARED, ... (cuobjdump)."""
    text = _tool("cuobjdump", cubin, "-res-usage").split("Resource usage:")[-1]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", text)}


def sass_mix(cubin: bytes) -> tuple[collections.Counter, str]:
    """(SASS opcode counts, the SASS text) of the cubin (nvdisasm)."""
    text = _tool("nvdisasm", cubin, "-c")
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, re.M)
    return collections.Counter(ops), text
