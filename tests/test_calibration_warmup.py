"""Each layer calibrates (outlier channels, key means) on the first real K/V it writes: never on
the steps of dummy prompts that vLLM's GPU worker runs at start-up (vllm_glue/warmup.py)."""
import sys
import types

import torch

from vllm_turboquant.vllm_glue import backend, warmup

NAME, HEADS, D = "turboquant_3.5_mse", 2, 64


def _layer_and_cache():
    impl = backend.TurboQuantImpl(4, D, D ** -0.5, HEADS, kv_cache_dtype=NAME)
    shape = backend.TurboQuantBackend.get_kv_cache_shape(8, 16, HEADS, D, NAME)
    return impl, torch.zeros(shape, dtype=torch.uint8)


def test_vllm_warmup_writes_are_stored_but_teach_calibration_nothing(monkeypatch):
    worker = types.ModuleType("vllm.v1.worker.gpu_worker")
    worker.warmup_kernels = lambda step: step()  # stands in for vLLM's: real steps, dummy prompts
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_worker", worker)
    impl, cache = _layer_and_cache()  # building a layer wraps the worker's warm-up
    dummy = torch.zeros(6, HEADS, D)
    dummy[::2, :, 3] = 40.0  # two meaningless vectors, repeated, as token ids 0 and 1 give
    worker.warmup_kernels(lambda: impl.do_kv_cache_update(None, dummy, dummy, cache,
                                                          torch.arange(6)))
    assert cache.any() and not impl.codec.calibrated  # stored, nothing learned
    assert not warmup.in_vllm_warmup()

    gen = torch.Generator().manual_seed(0)
    key = torch.randn(40, HEADS, D, generator=gen) * 2 + 0.5
    value = torch.randn(40, HEADS, D, generator=gen)
    impl.do_kv_cache_update(None, key, value, cache, torch.arange(16, 56))
    assert impl.codec.calibrated
    torch.testing.assert_close(impl.codec.key_mean, key.mean(0))  # from the real keys only


def test_without_a_gpu_worker_nothing_is_wrapped(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm.v1.worker.gpu_worker", raising=False)
    impl, cache = _layer_and_cache()
    key = torch.randn(20, HEADS, D)
    impl.do_kv_cache_update(None, key, key, cache, torch.arange(20))
    assert impl.codec.calibrated and not warmup.in_vllm_warmup()


def test_vllm_gpu_worker_warms_up_through_the_name_we_wrap():
    # The contract warmup.py relies on (vLLM 0.26): the GPU worker calls its module-level
    # `warmup_kernels` by name, so wrapping the module attribute reaches that call.
    import inspect

    worker = __import__("vllm.v1.worker.gpu_worker", fromlist=["Worker"])
    assert callable(getattr(worker, "warmup_kernels", None))
    assert "warmup_kernels(" in inspect.getsource(worker.Worker)
