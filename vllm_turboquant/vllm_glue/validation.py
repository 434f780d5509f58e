"""Early, clear errors for configurations TurboQuant cannot serve (checked at engine-config time)."""
from __future__ import annotations

import logging

from ..codec.formats import SUPPORTED_HEAD_SIZES
from ..codec.layout import BLOCK_SIZE_MULTIPLE

logger = logging.getLogger("vllm_turboquant")

MIN_CUDA_CAPABILITY = (8, 0)


def _fail(dtype: str, problem: str, fix: str = "use --kv-cache-dtype auto (bf16) or fp8") -> None:
    raise ValueError(f"kv_cache_dtype={dtype!r}: {problem}; {fix}.")


def check_model(vllm_config) -> None:
    cache, model = vllm_config.cache_config, vllm_config.model_config
    dtype = cache.cache_dtype
    if model.use_mla:
        _fail(dtype, "MLA models (latent KV cache, e.g. DeepSeek-V2/V3) are not supported")
    if getattr(model, "is_encoder_decoder", False):
        _fail(dtype, "encoder-decoder models are not supported (only decoder self-attention "
                     "is compressed)")
    if getattr(model, "runner_type", "generate") == "pooling":
        _fail(dtype, "pooling / encoder-only models keep no decode KV cache to compress")
    head = model.get_head_size()
    if head not in SUPPORTED_HEAD_SIZES:
        _fail(dtype, f"head_dim {head} is not supported (supported: "
                     f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))})")
    if cache.block_size % BLOCK_SIZE_MULTIPLE:
        _fail(dtype, f"--block-size {cache.block_size} is not a multiple of {BLOCK_SIZE_MULTIPLE}",
              "pass --block-size 16 (or any multiple of 16)")
    _check_device(dtype)


def _check_device(dtype: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    cap = current_platform.get_device_capability()
    if cap is not None and (cap.major, cap.minor) < MIN_CUDA_CAPABILITY:
        _fail(dtype, f"GPU compute capability {cap.major}.{cap.minor} is too old (TurboQuant needs "
                     f">= {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}: Ampere, Ada, Hopper "
                     "or Blackwell)")


def check_layer(selector_config) -> None:
    """Per attention layer, from vLLM's backend selector."""
    dtype = selector_config.kv_cache_dtype
    if selector_config.use_mla:
        _fail(dtype, "MLA attention layers are not supported")
    if selector_config.use_sparse:
        _fail(dtype, "sparse attention layers are not supported")
    if selector_config.attn_type != "decoder":
        _fail(dtype, f"{selector_config.attn_type} attention is not supported (only decoder "
                     "self-attention is compressed)")
    if selector_config.head_size not in SUPPORTED_HEAD_SIZES:
        _fail(dtype, f"head_dim {selector_config.head_size} is not supported (supported: "
                     f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))})")
    if selector_config.has_sink:
        _fail(dtype, "attention sinks (e.g. gpt-oss) are not supported")
