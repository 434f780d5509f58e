"""Kernel launches: cheap ones for the hot path, and compiling many kernel variants at once.

Triton's own launch path (`kernel[grid](...)`) binds and specializes every argument, hashes the
variant key and looks it up on each call: 35-70 µs of host time per launch on the H100 machine
(measured: the cache write 35 µs, the attention kernel ~65), and a decode step launches five per
layer. Where vLLM runs attention outside CUDA graphs (mixed prefill/decode steps, batch sizes it
did not capture) that host time is the step's time. `VariantLauncher` resolves a variant through
Triton once and then calls its compiled launcher directly (~10 µs), as long as the arguments
Triton specialized on still match.

A cold engine start compiles about a dozen variants of our kernels (decode, context-only, the
exact-copy tail, merge, dense read, write). One after another that took ~45 s on an H100 host;
Triton's compiler spends most of its time in MLIR/LLVM passes and in ptxas, which run in
parallel on threads. Inside `compiling_only()`, `launch` submits each variant's compile to a
thread pool (Triton's AsyncCompileMode) instead of running it; leaving the block waits for all.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from triton.runtime.errors import OutOfResources

_COMPILE_ONLY: ContextVar[bool] = ContextVar("turboquant_compile_only", default=False)
# Shared memory per program: 227 KB on Hopper and datacenter Blackwell, 163 KB on the A100, 99 KB
# on Ada, consumer Ampere and consumer Blackwell. Our variants are tuned on the H100; where one
# does not fit, Triton refuses to load it (OutOfResources), and `launch` retries it with fewer
# software-pipeline stages (each stage buffers the loop's streamed tiles once more), remembering
# the count that fits for the rest of the process.
TRITON_DEFAULT_STAGES = 3
_FITTED_STAGES: dict = {}


class SharedMemoryError(RuntimeError):
    """A kernel variant needs more shared memory than this GPU has, even unpipelined."""


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (unbounded off CUDA)."""
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def launch(kernel, grid: tuple[int, ...], *args, **kwargs):
    """kernel[grid](*args, **kwargs), returning what Triton returns (the compiled kernel on a
    GPU); inside `compiling_only()`, only its compile is submitted (no launch) and None returned.
    A variant too large for this GPU's shared memory runs with fewer pipeline stages; with one
    stage still too large, SharedMemoryError says so and what to use instead."""
    asked = kwargs
    if _FITTED_STAGES:  # only on GPUs where some variant did not fit: no hashing otherwise
        key = _variant_key(kernel, asked)
        if key in _FITTED_STAGES:
            kwargs = dict(kwargs, num_stages=_FITTED_STAGES[key])
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
        return None
    while True:
        try:
            return kernel[grid](*args, **kwargs)
        except OutOfResources as e:
            stages = kwargs.get("num_stages") or TRITON_DEFAULT_STAGES
            if e.name != "shared memory":
                raise
            if stages <= 1:
                raise SharedMemoryError(
                    f"TurboQuant kernel {_name(kernel)} needs {e.required} bytes of shared memory "
                    f"per program even without pipelining; this GPU allows {e.limit}. This model's "
                    "head size needs a GPU with more shared memory for TurboQuant (H100, A100): "
                    "use --kv-cache-dtype auto or fp8 on this one.") from e
            kwargs = dict(kwargs, num_stages=stages - 1)
            key = _variant_key(kernel, asked)  # the variant as callers ask for it
            if key is not None:
                _FITTED_STAGES[key] = stages - 1


def _name(kernel) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


def _variant_key(kernel, kwargs: dict):
    key = (kernel, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextmanager
def compiling_only(workers: int | None = None) -> Iterator[None]:
    """Launches in this block compile their variants in parallel and run nothing; all compiles
    have finished (or raised) when it exits. Host and PyTorch code in the block still runs.
    Under TRITON_INTERPRET nothing compiles: launches run as usual."""
    if _interpreted():
        yield
        return
    from triton.runtime._async_compile import AsyncCompileMode

    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="tq-compile") as pool, \
            AsyncCompileMode(pool):
        token = _COMPILE_ONLY.set(True)
        try:
            yield
        finally:
            _COMPILE_ONLY.reset(token)


def _idle_hook(hook) -> bool:
    """Triton 3.6's launch hooks are HookChains, empty unless a profiler registered one."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


class VariantLauncher:
    """One variant of a Triton kernel: its compile-time keyword arguments fixed, its other
    arguments passed positionally. The first launch (and any whose arguments no longer match what
    Triton specialized on: tensor dtypes, 16-byte pointer alignment, specialized integer values,
    32-bit integers, the device) goes through Triton; the others straight to the compiled
    kernel's launcher. Triton's launch hooks (profilers) turn the direct path off."""

    def __init__(self, kernel, **constexprs):
        self.kernel, self.constexprs = kernel, constexprs
        self._direct: tuple | None = None

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        d = self._direct
        if d is not None and not _COMPILE_ONLY.get() and self._matches(d, args):
            run, function, packed, tail, device = d[:5]
            g = (*grid, 1, 1)
            run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), function, packed,
                None, None, None, *args, *tail)
            return
        compiled = launch(self.kernel, grid, *args, **self.constexprs)
        if d is None and compiled is not None and not _interpreted():
            self._direct = self._resolve(compiled, args)

    def _resolve(self, compiled, args) -> tuple | None:
        from triton import knobs

        params = self.kernel.params
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
        if any(not p.is_constexpr for p in params[len(args):]) or \
                not all(_idle_hook(h) for h in hooks):
            return None
        device = torch.cuda.current_device()
        binder = self.kernel.device_caches[device][4]
        bound = binder(*args, **self.constexprs)[0]
        tail = tuple(bound.values())[len(args):]
        tensors, fixed, i32 = [], [], []
        for p, a in zip(params, args):
            if isinstance(a, torch.Tensor):
                tensors.append((p.num, a.dtype, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool) or not isinstance(a, int):
                continue  # floats and bools are never specialized
            elif not p.do_not_specialize:
                fixed.append((p.num, a))
            elif -2**31 <= a < 2**31:
                i32.append(p.num)
        return (compiled.run, compiled.function, compiled.packed_metadata, tail, device,
                tuple(tensors), tuple(fixed), tuple(i32), hooks)

    @staticmethod
    def _matches(d: tuple, args: tuple) -> bool:
        if torch.cuda.current_device() != d[4] or any(h is not None and h.calls for h in d[8]):
            return False  # another device, or a profiler hooked Triton's launches since
        for i, dtype, aligned in d[5]:
            a = args[i]
            if a.dtype != dtype or (aligned and a.data_ptr() % 16):
                return False
        for i, value in d[6]:
            if args[i] != value:
                return False
        return all(-2**31 <= args[i] < 2**31 for i in d[7])
