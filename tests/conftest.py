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


# In CI every test must run: a skip outside tests/kernels (which the interpreter run covers) means
# a missing dependency or a broken collection hook, and must fail the run rather than hide it.
_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not report.nodeid.startswith("tests/kernels/"):
        _UNEXPECTED_SKIPS.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS and os.environ.get("TQ_ALLOW_SKIPS") != "1":
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        reporter.write_line(f"FAILED: {len(_UNEXPECTED_SKIPS)} tests were skipped outside "
                            f"tests/kernels (set TQ_ALLOW_SKIPS=1 to allow), e.g. "
                            f"{_UNEXPECTED_SKIPS[0]}", red=True)
        session.exitstatus = 1
