"""Whether vLLM's own start-up warm-up is running, so calibration can ignore its writes.

vLLM 0.26's GPU worker (model runner v2) ends its start-up with `warmup_kernels`: a real prefill
and decode step of dummy prompts (token ids 0, 1 in every request) through real KV-cache slots.
Layers calibrate (outlier channels, key means) on the engine-start prompt that follows
(engine_calibration.py), or, where that is skipped, on their first real write: without this, on
two meaningless tokens. On the CPU that doubles Gemma-3-270M's attention error
(bench/calibration_sample.py's setup); on the H100 its KL was 3x the CPU plugin's (0.091 vs
0.030; the CPU worker has no such warm-up). The warm-up's pages are never
read again (its requests are dropped), so writing them uncalibrated is harmless.
"""
from __future__ import annotations

import functools
import sys

_WORKER_MODULE = "vllm.v1.worker.gpu_worker"
_active = False


def in_vllm_warmup() -> bool:
    return _active


def watch_vllm_warmup() -> None:
    """Wrap the GPU worker's warm-up (once per process; a no-op where no GPU worker is loaded,
    e.g. on CPU). Called when an attention layer is built: the worker module is loaded by then
    and its warm-up runs later, looking the name up at call time."""
    module = sys.modules.get(_WORKER_MODULE)
    inner = getattr(module, "warmup_kernels", None)
    if inner is None or getattr(inner, "_tq_watched", False):
        return

    @functools.wraps(inner)
    def warmup_kernels(*args, **kwargs):
        global _active
        _active = True
        try:
            return inner(*args, **kwargs)
        finally:
            _active = False

    warmup_kernels._tq_watched = True
    module.warmup_kernels = warmup_kernels
