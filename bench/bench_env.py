"""What the benchmark scripts share: the commit they report, freeing an engine between dtypes, and
running each dtype's engine in its own process."""
from __future__ import annotations

import gc

from vllm_turboquant.eval import commit_id  # noqa: F401  (one definition for benches and eval)


def release_engine(llm) -> None:
    """Shut an offline engine down and give its GPU memory back before the next one starts."""
    import torch

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def per_dtype_processes(dtypes: list[str], fn, *args) -> dict:
    """{dtype: fn(dtype, *args)}, each call in a fresh process when there are several. vLLM's
    in-process engine keeps its model and KV cache alive after shutdown (vLLM 0.26 on the CPU,
    with or without this plugin), so a second engine in the same process found an H100 full
    (8.8 of 79 GiB free). fn must be a module-level function; its result comes back pickled."""
    if len(dtypes) == 1:
        return {dtypes[0]: fn(dtypes[0], *args)}
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = {}
    for dtype in dtypes:
        with ctx.Pool(1) as pool:
            out[dtype] = pool.apply(fn, (dtype, *args))
    return out
