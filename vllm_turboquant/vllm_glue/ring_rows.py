"""Which ring of exact copies (codec/recent.py) each request of a step uses, stable for its life.

The exact copies of a sequence's newest tokens live in one ring per request. Indexing rings by the
request's position in the step's batch loses them whenever that position changes: vLLM's GPU model
runner v2 orders every step's batch decodes first (a prompt's last chunk is written at one
position and its first decode step reads at another, so a prompt's newest tokens were never read
exactly), and any request that finishes shifts the ones behind it. The symptom, on an H100 with
rings per batch position (needle at the end of 1,024-8,000-token prompts, 30 trials per length):
SmolLM2 turboquant_3.5_mse 0.77-0.80 vs 0.90-0.97 for bf16; the CPU runner, whose batch rows move
rarely, lost 4 points there (0.50 without the copies).

So rings belong to request ids: a request keeps its ring while it runs; a new one takes a free
ring or the least recently scheduled one's; when every ring is held by a request of the step,
the newcomer reads compressed pages only (-1). The worker's model runner reports each step's
request order (`track_request_order` wraps its input preparation); the metadata builder turns it
into the per-batch-row ring index `RecentTokens.ring_of_row` that the kernels read.
"""
from __future__ import annotations

import functools
import sys
import weakref
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

_RUNNERS = (("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs"),
            ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"))
_step_req_ids: list[str] | None = None
_step = 0


class RingRows:
    """Request id -> ring index in [0, rings), least recently scheduled evicted first."""

    def __init__(self, rings: int):
        self.rings = rings
        self._owner: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(rings - 1, -1, -1))  # pop() hands out ring 0 first

    def assign(self, req_ids: Sequence[str]) -> np.ndarray:
        """Ring of each request of a step, in batch order (int32; -1: none left)."""
        out = np.full(len(req_ids), -1, dtype=np.int32)
        new = []
        for i, r in enumerate(req_ids):
            ring = self._owner.get(r)
            if ring is None:
                new.append(i)
            else:
                self._owner.move_to_end(r)  # the step's own requests end up newest
                out[i] = ring
        step = set(req_ids)
        for i in new:
            if self._free:
                ring = self._free.pop()
            else:
                oldest = next(iter(self._owner))
                if oldest in step:  # every ring is held by a request of this step
                    continue
                ring = self._owner.pop(oldest)
            self._owner[req_ids[i]] = ring
            out[i] = ring
        return out


def step_request_order() -> tuple[int, list[str] | None]:
    """(step counter, request ids in batch order) of the step being prepared; ids are None
    outside a model runner's step (warm-up, profiling and graph-capture runs)."""
    return _step, _step_req_ids


def track_request_order() -> None:
    """Wrap the loaded model runners' input preparation (once per class) to record each step's
    request order. Called when an attention layer is built, after the runner's module loaded."""
    for module_name, class_name, method in _RUNNERS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        inner = cls.__dict__.get(method) if cls is not None else None
        if inner is None or getattr(inner, "_tq_wrapped", False):
            continue
        wrapper = _wrap_v2(inner) if method == "prepare_inputs" else _wrap_v1(inner)
        wrapper._tq_wrapped = True
        setattr(cls, method, wrapper)


def _record(req_ids: list[str] | None) -> None:
    global _step_req_ids, _step
    _step_req_ids, _step = req_ids, _step + 1


def _wrap_v2(inner):
    @functools.wraps(inner)
    def prepare_inputs(self, *args, **kwargs):
        batch = inner(self, *args, **kwargs)  # attention metadata is built after this returns
        _record(list(batch.req_ids))
        return batch
    return prepare_inputs


def _wrap_v1(inner):
    @functools.wraps(inner)
    def _prepare_inputs(self, *args, **kwargs):
        batch = self.input_batch  # already in the step's order (reordered in _update_states)
        _record(list(batch.req_ids[: batch.num_reqs]))
        try:
            return inner(self, *args, **kwargs)
        except BaseException:
            _record(None)
            raise
    return _prepare_inputs


class EngineRings:
    """The ring map every layer of one engine process reads (RecentTokens.ring_of_row), kept in
    step with the model runner's request order by the metadata builder (`update`)."""

    def __init__(self, rings: int, batch_rows: int, device):
        from ..codec.recent import identity_rings

        self.assigner = RingRows(rings)
        self.ring_of_row = identity_rings(max(batch_rows, rings), rings, device)
        self._step = -1
        self._last_ids: list[str] | None = None
        self._last: np.ndarray | None = None

    def update(self) -> None:
        """Map this step's batch rows to their requests' rings (once per step; a step the runner
        did not report keeps the last map: warm-up, profiling, graph capture)."""
        from ..kernels import to_device_async

        step, req_ids = step_request_order()
        if req_ids is None or step == self._step:
            return
        if self.ring_of_row.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a graph must not capture this copy (its pinned source is freed after)
        self._step = step
        if req_ids == self._last_ids:
            return  # steady decode: the same requests in the same order, the same rings
        self._last_ids = req_ids
        rings = self.assigner.assign(req_ids[: self.ring_of_row.shape[0]])
        if self._last is not None and np.array_equal(rings, self._last):
            return
        self._last = rings
        self.ring_of_row[: len(rings)].copy_(to_device_async(torch.from_numpy(rings),
                                                             self.ring_of_row.device))


# (weak reference to the engine's VllmConfig, its rings). Weak: the config reaches the model and
# its KV cache (compilation_config.static_forward_context), which must not outlive the engine.
_engine_rings: tuple[weakref.ref, EngineRings] | None = None


def engine_rings(vllm_config: object, rings: int, batch_rows: int, device) -> EngineRings:
    """The EngineRings of the engine whose config this is (built by its first layer; engines run
    one after another in a process, as in the eval, each gets its own)."""
    global _engine_rings
    if _engine_rings is None or _engine_rings[0]() is not vllm_config:
        _engine_rings = (weakref.ref(vllm_config), EngineRings(rings, batch_rows, device))
    return _engine_rings[1]


def current_engine_rings() -> EngineRings | None:
    return _engine_rings[1] if _engine_rings is not None else None
