"""Kernel launches, and compiling many kernel variants at once.

A cold engine start compiles about a dozen variants of our kernels (decode, context-only, the
exact-copy tail, merge, dense read, write). One after another that took ~45 s on an H100 host;
Triton's compiler spends most of its time in MLIR/LLVM passes and in ptxas, which run in
parallel on threads. Inside `compiling_only()`, `launch` submits each variant's compile to a
thread pool (Triton's AsyncCompileMode) instead of running it; leaving the block waits for all.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

_COMPILE_ONLY: ContextVar[bool] = ContextVar("turboquant_compile_only", default=False)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); inside `compiling_only()`, only its compile (no launch)."""
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


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
