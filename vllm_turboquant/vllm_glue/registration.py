"""Make vLLM 0.26 accept our kv_cache_dtype strings everywhere it validates them."""
from __future__ import annotations

import typing

import torch

from ..codec.formats import FORMATS

BACKEND_PATH = "vllm_turboquant.vllm_glue.backend.TurboQuantBackend"


def register_dtypes() -> None:
    """CLI choices, pydantic CacheConfig validation, the selector's assert, str→torch dtype map."""
    import vllm.config.cache as cache_mod
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    literal = cache_mod.CacheDType
    missing = tuple(n for n in FORMATS if n not in typing.get_args(literal))
    if missing:
        # CacheDType is one Literal object shared by pydantic, argparse and the selector: extend it
        # in place so every holder of a reference sees the new strings.
        literal.__args__ = literal.__args__ + missing
        rebuild_dataclass(cache_mod.CacheConfig, force=True)
        try:
            from vllm.engine import arg_utils
            arg_utils._compute_kwargs.cache_clear()  # argparse choices are derived once and cached
        except (ImportError, AttributeError):
            pass
    for name in FORMATS:
        # Pages are raw bytes; vLLM allocates and views them as uint8.
        STR_DTYPE_TO_TORCH_DTYPE.setdefault(name, torch.uint8)


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    vllm_register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
