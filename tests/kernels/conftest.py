import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # Triton kernels need a GPU, or the interpreter (which must be on before triton is imported).
    # This hook sees every collected item of the session: touch only the ones in this folder.
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
