"""Engine starts that lose a GPU memory race with another process are retried; others are not."""
import pytest

from vllm_turboquant.quality.shared_gpu import chunked_prefill_args, start_engine


def _flaky(failures: list[Exception]):
    calls = []

    def make():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "engine"
    return make, calls


def test_a_memory_race_is_retried_until_the_engine_starts():
    wrapped = RuntimeError("Engine core initialization failed")
    wrapped.__cause__ = AssertionError("Error in memory profiling. Initial free memory 31.9 GiB")
    make, calls = _flaky([wrapped, ValueError("No available memory for the cache blocks.")])
    assert start_engine(make, pause_s=0, log=lambda s: None) == "engine"
    assert len(calls) == 3


def test_other_start_failures_are_raised_at_once():
    make, calls = _flaky([ValueError("head_size 80 is not supported")])
    with pytest.raises(ValueError, match="head_size"):
        start_engine(make, pause_s=0, log=lambda s: None)
    assert len(calls) == 1


def test_a_race_that_never_clears_is_raised_after_the_last_try():
    make, calls = _flaky([AssertionError("Error in memory profiling")] * 5)
    with pytest.raises(AssertionError):
        start_engine(make, tries=3, pause_s=0, log=lambda s: None)
    assert len(calls) == 3


def test_chunked_prefill_caps_max_num_seqs_at_the_chunk():
    # vLLM rejects max_num_seqs > max_num_batched_tokens at engine start (the GPU eval configs'
    # 256 sequences with 64-token chunks once failed every dtype that way).
    args = chunked_prefill_args(64, {"max_num_seqs": 256, "gpu_memory_utilization": 0.1})
    assert args == {"max_num_seqs": 64, "gpu_memory_utilization": 0.1,
                    "max_num_batched_tokens": 64, "enable_chunked_prefill": True}
    assert chunked_prefill_args(8192, {"max_num_seqs": 256})["max_num_seqs"] == 256
    assert "max_num_seqs" not in chunked_prefill_args(64)
