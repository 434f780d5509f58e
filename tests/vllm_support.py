"""Shared helpers for tests that run vLLM on the CPU with the built-in SmolLM2."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from vllm_turboquant.eval import llm_engine
from vllm_turboquant.models import smollm2_path

CHUNK = 64  # max_num_batched_tokens: later chunks attend to earlier ones through the cache


@contextlib.contextmanager
def engine(kv_cache_dtype: str, model: str | None = None, **kwargs):
    args = dict(model=model or str(smollm2_path()), kv_cache_dtype=kv_cache_dtype,
                enforce_eager=True, max_model_len=2048, max_num_batched_tokens=CHUNK,
                enable_chunked_prefill=True, disable_log_stats=False, seed=0)
    args.update(kwargs)
    with llm_engine(**args) as llm:
        yield llm


def kv_capacity_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def dummy_llama(tmp: Path, head_dim: int) -> str:
    """A tiny Llama config with the given head_dim, for load_format='dummy' (no weights)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
           "intermediate_size": 1024, "num_attention_heads": 512 // head_dim * 2,
           "num_key_value_heads": 2, "head_dim": head_dim, "num_hidden_layers": 2,
           "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    path = tmp / f"llama_d{head_dim}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def dummy_gemma3(tmp: Path) -> str:
    """Gemma-3-270M's attention shape (head_dim 256, 1 KV head, 512-token sliding windows on 5 of
    every 6 layers), without weights."""
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
           "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 256, "num_hidden_layers": 6, "vocab_size": 1024,
           "max_position_embeddings": 32768, "sliding_window": 512,
           "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
           "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}
    path = tmp / "gemma3_shape"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
