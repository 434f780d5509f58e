import os

import pytest
import torch

# vLLM in tests: single process, no torch.compile, small CPU KV budget (see README "Testing").
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


_MEASUREMENTS: list[str] = []


@pytest.fixture
def report():
    """Record a measured number; all of them are printed in the run's summary (visible in CI).
    (capsys would replace sys.stdout, whose real file descriptor vLLM needs.)"""
    return _MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("TurboQuant measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
