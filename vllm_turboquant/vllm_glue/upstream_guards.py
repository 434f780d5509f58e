"""Keep vLLM 0.26's own TurboQuant code away from our `turboquant_*` strings.

Upstream treats every string starting with `turboquant_` as one of its presets. For ours we:
- skip its boundary-layer bf16 override (we compress all layers unless the user asks otherwise),
- undo its forced FlashAttention-2 (and silence its warning about it),
- answer `get_kv_cache_spec` with our exact packed page size instead of TurboQuantConfig's (which
  raises for names it does not know),
- stop its TURBOQUANT backend from claiming our dtypes, and route them to our backend instead.
Upstream presets (`turboquant_4bit_nc`, ...) take the original code paths untouched.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging

from ..codec.formats import FORMATS, is_turboquant_dtype
from . import options, validation
from .registration import BACKEND_PATH

logger = logging.getLogger("vllm_turboquant")
_building_ours = contextvars.ContextVar("tq_building_engine_config", default=False)


class _DropUpstreamTurboQuantWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_building_ours.get() and "TurboQuant" in str(record.msg))


@contextlib.contextmanager
def _ours():
    token = _building_ours.set(True)
    try:
        yield
    finally:
        _building_ours.reset(token)


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_tq_patched", False):
        return

    def create_engine_config(self, *args, **kwargs):
        if not is_turboquant_dtype(self.kv_cache_dtype):
            return original(self, *args, **kwargs)
        attn = self.attention_config
        user_fa = attn.get("flash_attn_version") if isinstance(attn, dict) else getattr(
            attn, "flash_attn_version", None)
        with _ours():
            config = original(self, *args, **kwargs)
        config.attention_config.flash_attn_version = user_fa
        validation.check_model(config)
        _apply_layer_options(config)
        return config

    create_engine_config._tq_patched = True
    EngineArgs.create_engine_config = create_engine_config
    logging.getLogger("vllm.engine.arg_utils").addFilter(_DropUpstreamTurboQuantWarnings())


def _apply_layer_options(config) -> None:
    cache = config.cache_config
    num_layers = config.model_config.get_total_num_hidden_layers()
    skip = set(cache.kv_cache_dtype_skip_layers)
    keep = options.bf16_layer_indices(num_layers)
    window = config.model_config.get_sliding_window()
    if keep and window is not None:
        # vLLM's allocator then needs every layer's page size to divide the largest; bf16 pages
        # do not divide TurboQuant's, and it would fail deep in its KV cache set-up.
        raise ValueError(
            f"kv_cache_dtype={cache.cache_dtype!r}: TURBOQUANT_BF16_FIRST_LAYERS / "
            f"TURBOQUANT_BF16_LAST_LAYERS cannot keep layers in bf16 in a model with "
            f"sliding-window layers (window {window}: vLLM's KV allocator needs page sizes that "
            f"divide each other); unset them, or use --kv-cache-dtype auto (bf16) or fp8.")
    full = options.full_attention_dtype(cache.cache_dtype, config.model_config.get_head_size())
    if full != cache.cache_dtype:  # checked here so a bad value fails before any worker starts
        logger.info("TurboQuant: full-attention layers store %s (TURBOQUANT_FULL_ATTENTION_DTYPE)",
                    full)
    if keep:
        logger.info("TurboQuant: keeping layers %s in bf16 (TURBOQUANT_BF16_*_LAYERS)", keep)
        skip |= {str(i) for i in keep}
    cache.kv_cache_dtype_skip_layers = sorted(skip, key=lambda x: (not x.isdigit(), x.zfill(6)))


def _patch_boundary_skip() -> None:
    try:
        from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    except ImportError:
        return
    original = TurboQuantConfig.get_boundary_skip_layers
    if getattr(original, "_tq_patched", False):
        return

    def get_boundary_skip_layers(*args, **kwargs):
        return [] if _building_ours.get() else original(*args, **kwargs)

    get_boundary_skip_layers._tq_patched = True
    TurboQuantConfig.get_boundary_skip_layers = staticmethod(get_boundary_skip_layers)


def _patch_kv_cache_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    from .specs import TQSlidingWindowSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, "_tq_patched", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        if not is_turboquant_dtype(self.kv_cache_dtype):
            return original(self, vllm_config)
        common = dict(block_size=vllm_config.cache_config.block_size,
                      num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                      head_size_v=self.head_size, dtype=self.kv_cache_torch_dtype,
                      tq_slot_size=FORMATS[self.kv_cache_dtype].bytes_per_token_head(self.head_size))
        if self.sliding_window is not None:
            # Compressed too: equal page sizes let vLLM's hybrid allocator group the layers, and
            # blocks that slide out of the window are freed as usual.
            return TQSlidingWindowSpec(sliding_window=self.sliding_window, **common)
        return TQFullAttentionSpec(**common)

    get_kv_cache_spec._tq_patched = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _patch_backend_selection() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "_tq_patched", False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if is_turboquant_dtype(attn_selector_config.kv_cache_dtype):
            validation.check_layer(attn_selector_config)
            return BACKEND_PATH
        return original_func(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._tq_patched = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _patch_upstream_backend_claim() -> None:
    try:
        from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
    except Exception:  # noqa: BLE001 - optional GPU module; absent or unimportable on some builds
        return
    original = TurboQuantAttentionBackend.supports_kv_cache_dtype
    if getattr(original, "_tq_patched", False):
        return
    original_func = original.__func__

    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return not is_turboquant_dtype(kv_cache_dtype) and original_func(cls, kv_cache_dtype)

    supports_kv_cache_dtype._tq_patched = True
    TurboQuantAttentionBackend.supports_kv_cache_dtype = classmethod(supports_kv_cache_dtype)


def install() -> None:
    _patch_engine_args()
    _patch_boundary_skip()
    _patch_kv_cache_spec()
    _patch_backend_selection()
    _patch_upstream_backend_claim()
