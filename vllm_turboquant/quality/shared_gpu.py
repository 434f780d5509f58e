"""Starting vLLM engines on a GPU that other processes share.

vLLM sizes its KV cache from a memory profile taken at start-up, and refuses to start when another
process frees or takes GPU memory meanwhile ("Error in memory profiling", "No available memory for
the cache blocks"). Two evaluations side by side on one GPU (each engine within its
gpu_memory_utilization) hit that whenever one starts while the other switches engines: such a
start is retried after a pause instead of losing the dtype's results.

The eval's engines also share one way of prefilling in small chunks (`chunked_prefill_args`).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")
RACES = ("Error in memory profiling", "No available memory for the cache blocks")


def start_engine(make: Callable[[], T], tries: int = 4, pause_s: float = 30.0,
                 log: Callable[[str], None] = print) -> T:
    """make(), retried when it fails only because the GPU's free memory moved under it."""
    for attempt in range(1, tries + 1):
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - vLLM wraps the cause in several exception types
            chain, cause = [], e
            while cause is not None:
                chain.append(str(cause))
                cause = cause.__cause__ or cause.__context__
            if attempt == tries or not any(r in text for text in chain for r in RACES):
                raise
            log(f"    engine start lost a GPU memory race with another process; retrying in "
                f"{pause_s:.0f} s ({attempt}/{tries - 1})")
            time.sleep(pause_s)
    raise AssertionError("unreachable")


def chunked_prefill_args(chunk: int, engine_args: dict | None = None) -> dict:
    """Engine arguments that prefill in chunks of `chunk` tokens (max_num_batched_tokens), with
    the caller's `engine_args`. vLLM refuses max_num_seqs > max_num_batched_tokens, so a config's
    max_num_seqs (sized for long needle chunks) is capped at the chunk."""
    args = dict(engine_args or {})
    chunk = max(int(chunk), 1)
    if "max_num_seqs" in args:
        args["max_num_seqs"] = min(int(args["max_num_seqs"]), chunk)
    return dict(args, max_num_batched_tokens=chunk, enable_chunked_prefill=True)
