"""What the benchmark scripts share: the commit they report and freeing an engine between dtypes."""
from __future__ import annotations

import gc
import os
import subprocess


def commit_id() -> str:
    """Short commit of the working tree; TQ_COMMIT where there is no .git (the device machine)."""
    return os.environ.get("TQ_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip() or "unknown"


def release_engine(llm) -> None:
    """Shut an offline engine down and give its GPU memory back before the next one starts."""
    import torch

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
