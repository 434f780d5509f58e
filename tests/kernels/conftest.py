import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Triton kernels need a GPU, or the interpreter (which must be on before triton is imported).
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py)")
    for item in items:
        item.add_marker(skip)
