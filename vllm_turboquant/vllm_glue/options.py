"""User options that are not kv_cache_dtype strings (environment variables, documented in README).

TURBOQUANT_BF16_FIRST_LAYERS=N   keep the first N decoder layers' KV cache in bf16 (default 0)
TURBOQUANT_BF16_LAST_LAYERS=N    keep the last N decoder layers' KV cache in bf16 (default 0)
TURBOQUANT_QJL_DECODE=min_mse    decode constant for QJL keys: min_mse (default) or unbiased
TURBOQUANT_CENTER_KEYS=1         remove a KV head's key mean before quantizing where that does not
                                 lengthen the attention sink's key (default 1; 0: never)
TURBOQUANT_EXACT_RECENT=64       each sequence reads its newest N tokens exactly (fp16 copies beside
                                 the pages; 0 turns it off)
TURBOQUANT_EXACT_ROWS=N          how many running requests get those copies, one ring each
                                 (default min(max_num_seqs, 256)); memory per layer:
                                 rows · N · kv_heads · (4 · head_dim + 8) bytes
TURBOQUANT_CALIBRATION_TOKENS=1024
                                 tokens of built-in text every layer calibrates on when the
                                 engine starts (0: the first request's first chunk calibrates)
TURBOQUANT_FULL_ATTENTION_DTYPE=D
                                 store the full-attention (not sliding-window) layers in format D,
                                 one with the page bytes of --kv-cache-dtype (turboquant_3.5_kb
                                 with turboquant_3.5_mse): e.g. more key bits where Gemma-3's
                                 global layers read 32k tokens (default: --kv-cache-dtype)
All layers are compressed by default; fragile models sometimes need their first/last layers exact
(not in models with sliding-window layers: vLLM's allocator cannot mix the page sizes there).
Every process reads the same environment, so API server, engine core and workers agree.
"""
from __future__ import annotations

import os


def full_attention_dtype(kv_cache_dtype: str, head_size: int) -> str:
    """The format of a full-attention layer: TURBOQUANT_FULL_ATTENTION_DTYPE if set, checked to
    store what kv_cache_dtype stores per token (vLLM sizes every layer's pages alike, and a
    sliding-window model's allocator cannot mix page sizes)."""
    from ..codec.formats import FORMATS

    name = os.environ.get("TURBOQUANT_FULL_ATTENTION_DTYPE", "").strip()
    if not name or name == kv_cache_dtype:
        return kv_cache_dtype
    if name not in FORMATS:
        raise ValueError(f"TURBOQUANT_FULL_ATTENTION_DTYPE={name!r} is not a TurboQuant format; "
                         f"use one of {', '.join(FORMATS)}, or unset it.")
    want = FORMATS[kv_cache_dtype].bytes_per_token_head(head_size)
    same = [n for n, f in FORMATS.items() if f.bytes_per_token_head(head_size) == want]
    if name not in same:
        raise ValueError(
            f"TURBOQUANT_FULL_ATTENTION_DTYPE={name!r} stores "
            f"{FORMATS[name].bytes_per_token_head(head_size)} bytes per token and KV head at "
            f"head_dim {head_size}, --kv-cache-dtype {kv_cache_dtype} {want}: every layer's pages "
            f"must be the same size. With {kv_cache_dtype} use one of {', '.join(same)}.")
    return name


def _int_env(name: str, default: int = 0) -> int:
    raw = os.environ.get(name, str(default)).strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def bf16_layer_indices(num_layers: int) -> list[int]:
    first = _int_env("TURBOQUANT_BF16_FIRST_LAYERS")
    last = _int_env("TURBOQUANT_BF16_LAST_LAYERS")
    keep = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    return sorted(keep)


def qjl_decode() -> str:
    from ..codec.quantizer import QJL_DECODES

    mode = os.environ.get("TURBOQUANT_QJL_DECODE", "min_mse").strip() or "min_mse"
    if mode not in QJL_DECODES:
        raise ValueError(f"TURBOQUANT_QJL_DECODE must be one of {QJL_DECODES}, got {mode!r}")
    return mode


def center_keys() -> bool:
    raw = os.environ.get("TURBOQUANT_CENTER_KEYS", "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"TURBOQUANT_CENTER_KEYS must be 0 or 1, got {raw!r}")
    return raw in ("1", "true", "yes", "")


DEFAULT_EXACT_RECENT = 64
MAX_DEFAULT_EXACT_ROWS = 256


def exact_recent() -> int:
    return _int_env("TURBOQUANT_EXACT_RECENT", DEFAULT_EXACT_RECENT)


def exact_rows(max_num_seqs: int) -> int:
    return _int_env("TURBOQUANT_EXACT_ROWS", min(max_num_seqs, MAX_DEFAULT_EXACT_ROWS))


DEFAULT_CALIBRATION_TOKENS = 1024


def calibration_tokens() -> int:
    return _int_env("TURBOQUANT_CALIBRATION_TOKENS", DEFAULT_CALIBRATION_TOKENS)
