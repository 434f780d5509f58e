"""A request keeps its ring of exact copies while it runs, wherever the batch puts it."""
import numpy as np

from vllm_turboquant.vllm_glue.ring_rows import RingRows


def test_a_request_keeps_its_ring_when_the_batch_reorders():
    rings = RingRows(4)
    first = rings.assign(["a", "b", "c"])
    assert sorted(first.tolist()) == [0, 1, 2]
    # decodes first (v2 runner), "b" finished, "d" joins: the survivors keep their rings
    again = rings.assign(["c", "a", "d"])
    assert again[0] == first[2] and again[1] == first[0]
    assert again[2] not in (first[0], first[2])


def test_new_requests_take_the_least_recently_scheduled_ring():
    rings = RingRows(2)
    a, b = rings.assign(["a", "b"])
    rings.assign(["b"])                           # "a" not scheduled: it is the oldest now
    (c,) = rings.assign(["c"])
    assert c == a
    assert rings.assign(["b", "c"]).tolist() == [b, c]


def test_requests_beyond_the_rings_get_none_rather_than_anothers():
    rings = RingRows(2)
    out = rings.assign(["a", "b", "c"])
    assert out.tolist()[:2] == [0, 1] and out[2] == -1
    assert rings.assign(["a", "b", "c"])[2] == -1  # every ring is held by this step's requests
    out = rings.assign(["c"])                       # a ring frees up once "a" or "b" is not run
    assert out[0] in (0, 1)
    assert out.dtype == np.int32


def test_vllm_runners_prepare_inputs_through_the_names_we_wrap():
    # The contract ring_rows.track_request_order relies on (vLLM 0.26): each runner prepares a
    # step's inputs in the method we wrap, before its attention metadata is built.
    import inspect

    import pytest

    pytest.importorskip("vllm")
    from vllm.v1.worker import gpu_model_runner as v1
    from vllm.v1.worker.gpu import input_batch, model_runner as v2

    src = inspect.getsource(v2.GPUModelRunner.execute_model)
    assert "prepare_inputs" in v2.GPUModelRunner.__dict__
    assert src.index("self.prepare_inputs(") < src.index("prepare_attn(input_batch")
    assert "req_ids" in input_batch.InputBatch.__dataclass_fields__
    src = inspect.getsource(v1.GPUModelRunner.execute_model)
    assert "_prepare_inputs" in v1.GPUModelRunner.__dict__
    assert src.index("self._update_states(") < src.index("self._prepare_inputs(")


def test_wrapped_runners_report_the_step_order(monkeypatch):
    import sys
    import types

    from vllm_turboquant.vllm_glue import ring_rows

    class Batch:
        req_ids = ["b", "a"]

    class Runner:
        def prepare_inputs(self, scheduler_output, batch_desc):
            return Batch()

    module = types.ModuleType("vllm.v1.worker.gpu.model_runner")
    module.GPUModelRunner = Runner
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu.model_runner", module)
    monkeypatch.setattr(ring_rows, "_step_req_ids", None)  # restored: engines in later tests
    ring_rows.track_request_order()
    ring_rows.track_request_order()  # idempotent: wrapped once
    step = ring_rows.step_request_order()[0]
    assert isinstance(Runner().prepare_inputs(None, None), Batch)
    assert ring_rows.step_request_order() == (step + 1, ["b", "a"])


def test_the_engine_map_follows_each_reported_step(monkeypatch):
    from vllm_turboquant.vllm_glue import ring_rows

    monkeypatch.setattr(ring_rows, "_step_req_ids", None)
    rings = ring_rows.EngineRings(rings=2, batch_rows=4, device="cpu")
    assert rings.ring_of_row.tolist() == [0, 1, -1, -1]  # before any step: batch row = ring
    ring_rows._record(["x", "y", "z"])
    rings.update()
    assert rings.ring_of_row[:3].tolist() == [0, 1, -1]
    ring_rows._record(["z", "y"])  # "x" finished: "z" takes its ring, "y" keeps its own
    rings.update()
    assert rings.ring_of_row[:2].tolist() == [0, 1]
    rings.ring_of_row[0] = 7
    rings.update()  # the same step again (another KV-cache group's builder): nothing changes
    assert rings.ring_of_row[0] == 7
    ring_rows._record(None)  # outside a runner step (warm-up, capture): the map stays
    rings.update()
    assert rings.ring_of_row[0] == 7


def test_engine_rings_do_not_keep_the_engine_alive():
    # The config reaches the model and its KV cache: once the engine is gone, so must they be.
    import gc
    import weakref

    from vllm_turboquant.vllm_glue.ring_rows import engine_rings

    class Config:
        pass

    first = Config()
    rings = engine_rings(first, 4, 8, "cpu")
    assert engine_rings(first, 4, 8, "cpu") is rings  # every layer of one engine shares them
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
    assert engine_rings(Config(), 4, 8, "cpu") is not rings  # the next engine gets its own
