"""Each layer fixes its outlier channels and key means once, at engine start, from 1,024 tokens of
built-in text (vllm_glue/engine_calibration.py); never from the steps of dummy prompts that vLLM's
GPU worker runs at start-up (vllm_glue/warmup.py), and never from a short first request."""
import sys
import types

import pytest
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


# --- through vLLM on the CPU, SmolLM2 ------------------------------------------------------------


def _layer_states(llm) -> list[tuple[bool, torch.Tensor, torch.Tensor]]:
    from vllm_turboquant.vllm_glue.engine_calibration import turboquant_layers

    def states(worker):
        return [(impl.calibrated, impl.codec.key_perm.clone(), impl.codec.key_mean.clone())
                if impl.codec is not None else (False, None, None)
                for impl in turboquant_layers(worker.vllm_config)]

    return llm.collective_rpc(states)[0]


@pytest.fixture(scope="module")
def started():
    """An engine right after start-up, and what it holds after one short first request."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from .vllm_support import engine

    with engine("turboquant_3.5_mse", enable_prefix_caching=True) as llm:
        at_start = _layer_states(llm)
        llm.generate(["Hi"], SamplingParams(max_tokens=4, temperature=0))
        after_hi = _layer_states(llm)
        from transformers import AutoTokenizer

        from vllm_turboquant.models import smollm2_path
        from vllm_turboquant.quality.corpus import calibration_ids

        ids = calibration_ids(AutoTokenizer.from_pretrained(str(smollm2_path())), 1024)
        same = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1))[0]
        yield {"at_start": at_start, "after_hi": after_hi, "ids": ids,
               "cached": same.num_cached_tokens}


@pytest.mark.slow
def test_every_layer_is_calibrated_before_the_first_request(started):
    assert len(started["at_start"]) == 30
    assert all(calibrated for calibrated, _, _ in started["at_start"])


@pytest.mark.slow
def test_a_short_first_request_changes_nothing(started):
    for (_, perm0, mean0), (_, perm1, mean1) in zip(started["at_start"], started["after_hi"]):
        assert torch.equal(perm0, perm1) and torch.equal(mean0, mean1)


@pytest.mark.slow
def test_calibration_saw_the_built_in_text(started):
    # Layer 0's keys depend on the embeddings alone: its key mean must be the mean of the HF
    # model's post-RoPE keys over the calibration prompt (vLLM computes them in bf16).
    from vllm_turboquant.models import smollm2_path
    from vllm_turboquant.quality import hf_sim

    model, _ = hf_sim.load_model(str(smollm2_path()))
    _, keys, _ = hf_sim.capture_qkv(model, started["ids"])[0]
    torch.testing.assert_close(started["at_start"][0][2].cpu(), keys.mean(0), atol=0.05, rtol=0.02)


@pytest.mark.slow
def test_the_calibration_prompt_leaves_nothing_in_the_prefix_cache(started):
    assert started["cached"] == 0


@pytest.mark.slow
def test_calibration_tokens_zero_leaves_it_to_the_first_request(monkeypatch):
    from .vllm_support import engine

    monkeypatch.setenv("TURBOQUANT_CALIBRATION_TOKENS", "0")
    with engine("turboquant_3.5_mse") as llm:
        assert not any(calibrated for calibrated, _, _ in _layer_states(llm))
