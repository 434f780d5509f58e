"""Every layer calibrates on built-in text when the engine starts, before any request.

Each layer fixes its outlier channels and key means once, from the K/V it observes, and keeps them
for the engine's lifetime (codec/kv_codec.py). Left to the first request, a short one (a chat
"Hi", a health check) fixes them from a handful of tokens: on Gemma-3-270M's real K/V the
attention error is 0.213 after 16 tokens and 0.159 after 1,024 (bench/calibration_sample.py).

So when a worker finishes its start-up (`compile_or_warm_up_model`, after vLLM's own warm-up and
graph capture), it prefills TURBOQUANT_CALIBRATION_TOKENS (1,024) tokens of a built-in document
that no evaluation reads (`corpus.calibration_text`) as one internal request, in chunks of
`max_num_batched_tokens` like any prompt. The layers only observe those K/V; each fixes its split
when the prompt is done. The request never passes through the scheduler: its blocks count as
free afterwards and it can never be a prefix-cache hit, exactly like vLLM's own warm-up requests.

Skipped, leaving calibration to the first real request's first chunk: with
TURBOQUANT_CALIBRATION_TOKENS=0, without a tokenizer (`skip_tokenizer_init`), when the text's
token ids fall outside the model's vocabulary (configs with dummy weights), or when the cache
has too few blocks.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from vllm.logger import init_logger

from . import options

logger = init_logger("vllm.turboquant")  # vLLM's handlers print it (INFO) in its processes

_WORKERS = (("vllm.v1.worker.gpu_worker", "Worker"), ("vllm.v1.worker.cpu_worker", "CPUWorker"))
_REQUEST_ID = "_turboquant_calibration_"
_active = False


def calibrating() -> bool:
    """True while the calibration prompt runs: layers observe their K/V instead of fixing."""
    return _active


def calibrate_at_engine_start() -> None:
    """Wrap the loaded workers' `compile_or_warm_up_model` (once per class). Called when an
    attention layer is built: the worker's module is loaded by then, and the method is looked up
    on the class when the worker calls it later."""
    for module_name, class_name in _WORKERS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        inner = cls.__dict__.get("compile_or_warm_up_model") if cls is not None else None
        if inner is None or getattr(inner, "_tq_wrapped", False):
            continue

        @functools.wraps(inner)
        def compile_or_warm_up_model(self, *args, _inner=inner, **kwargs):
            result = _inner(self, *args, **kwargs)
            calibrate_worker(self)
            return result

        compile_or_warm_up_model._tq_wrapped = True
        setattr(cls, "compile_or_warm_up_model", compile_or_warm_up_model)


def turboquant_layers(vllm_config) -> list:
    from .backend import TurboQuantImpl

    context = vllm_config.compilation_config.static_forward_context
    impls = (getattr(layer, "impl", None) for layer in context.values())
    return [impl for impl in impls if isinstance(impl, TurboQuantImpl)]


@torch.inference_mode()  # as vLLM's own warm-up: the kernels' tables are inference tensors
def calibrate_worker(worker: Any) -> bool:
    """Run the calibration prompt on this worker if any TurboQuant layer still needs it.
    Returns whether every such layer is calibrated afterwards."""
    layers = [impl for impl in turboquant_layers(worker.vllm_config) if not impl.calibrated]
    if not layers:
        return True
    ids = _prompt_ids(worker.vllm_config)
    if ids is None:
        return False
    global _active
    _active = True
    try:
        ran = _prefill(worker, ids)
    finally:
        _active = False
    if not ran:
        return False
    for impl in layers:
        impl.finish_calibration()
    done = all(impl.calibrated for impl in layers)
    logger.info("TurboQuant: %d layers calibrated on %d tokens of built-in text%s", len(layers),
                len(ids), "" if done else " (some layers saw none; their first request calibrates)")
    return done


def _prompt_ids(vllm_config) -> list[int] | None:
    """Token ids of the calibration prompt, or None (and why, in the log) where it is skipped."""
    want = options.calibration_tokens()
    model_config = vllm_config.model_config
    if want == 0:
        return None
    from vllm.tokenizers import cached_tokenizer_from_config

    from ..quality.corpus import calibration_ids

    tokenizer = cached_tokenizer_from_config(model_config)
    if tokenizer is None:
        logger.info("TurboQuant: no tokenizer (skip_tokenizer_init); the first request calibrates")
        return None
    ids = calibration_ids(tokenizer, min(want, model_config.max_model_len - 1))
    if max(ids) >= model_config.get_vocab_size():
        logger.info("TurboQuant: the tokenizer's ids exceed the model's vocabulary; the first "
                    "request calibrates")
        return None
    return ids


def _prefill(worker: Any, ids: list[int]) -> bool:
    """One request prefilling `ids` through the worker, chunked by max_num_batched_tokens, then
    finished: built the way vLLM's own warm-up builds its requests (gpu/warmup.py). An error
    propagates: the runner's state after it is unknown, so the engine must not start."""
    from vllm import SamplingParams
    from vllm.utils.math_utils import cdiv
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    runner = worker.model_runner
    groups = runner.kv_cache_config.kv_cache_groups
    counts = [cdiv(len(ids), g.kv_cache_spec.block_size) for g in groups]
    if sum(counts) >= runner.kv_cache_config.num_blocks:  # block 0 is vLLM's null block
        logger.info("TurboQuant: too few KV blocks for the calibration prompt; the first "
                    "request calibrates")
        return False
    starts = [1 + sum(counts[:i]) for i in range(len(counts))]
    block_ids = tuple(list(range(s, s + c)) for s, c in zip(starts, counts))
    request = Request(_REQUEST_ID, ids, SamplingParams(max_tokens=1, temperature=0.0), None)
    chunk = worker.vllm_config.scheduler_config.max_num_batched_tokens
    connector = getattr(runner, "kv_connector", None)
    if connector is not None:
        connector.set_disabled(True)
    try:
        for done in range(0, len(ids), chunk):
            step = SchedulerOutput.make_empty()
            if done == 0:
                step.scheduled_new_reqs = [NewRequestData.from_request(
                    request, block_ids=block_ids, prefill_token_ids=ids)]
            else:
                cached = CachedRequestData.make_empty()
                cached.req_ids, cached.num_computed_tokens = [_REQUEST_ID], [done]
                cached.num_output_tokens, cached.new_block_ids = [0], [None]
                step.scheduled_cached_reqs = cached
            n = min(chunk, len(ids) - done)
            step.num_scheduled_tokens = {_REQUEST_ID: n}
            step.total_num_scheduled_tokens = n
            step.num_common_prefix_blocks = [0] * len(groups)
            worker.execute_model(step)
            worker.sample_tokens(None)
        cleanup = SchedulerOutput.make_empty()
        cleanup.finished_req_ids = {_REQUEST_ID}
        worker.execute_model(cleanup)
    finally:
        if connector is not None:
            connector.set_disabled(False)
    return True
