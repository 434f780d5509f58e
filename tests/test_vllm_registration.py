"""Our dtype strings are accepted by vLLM's CLI, config and selector; upstream presets are untouched."""
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from vllm_turboquant.codec import FORMATS  # noqa: E402
from vllm_turboquant.plugin import register  # noqa: E402

register()


def test_registration_is_idempotent():
    import typing

    from vllm.config.cache import CacheDType

    register()
    register()
    args = typing.get_args(CacheDType)
    for name in FORMATS:
        assert args.count(name) == 1


def test_cache_config_accepts_our_dtypes_and_rejects_typos():
    from vllm.config import CacheConfig

    for name in FORMATS:
        assert CacheConfig(cache_dtype=name).cache_dtype == name
    with pytest.raises(Exception, match="turboquant_3.5"):
        CacheConfig(cache_dtype="turboquant_3.4")


def test_cli_help_lists_our_dtypes_and_typo_is_an_invalid_choice():
    # A fresh process: the plugin must register itself through the entry point alone.
    code = ("from vllm.engine.arg_utils import EngineArgs\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "from vllm.plugins import load_general_plugins\n"
            "load_general_plugins()\n"
            "p = EngineArgs.add_cli_args(FlexibleArgumentParser())\n"
            "import sys\n"
            "p.parse_args(sys.argv[1:])\n")
    ok = subprocess.run([sys.executable, "-c", code, "--kv-cache-dtype", "turboquant_3.5"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", code, "--kv-cache-dtype", "turboquant_35"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "invalid choice" in bad.stderr
    for name in FORMATS:
        assert name in bad.stderr


def test_upstream_presets_keep_their_own_paths():
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend

    assert TurboQuantAttentionBackend.supports_kv_cache_dtype("turboquant_4bit_nc")
    assert not TurboQuantAttentionBackend.supports_kv_cache_dtype("turboquant_3.5")
    assert TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 128).slot_size_aligned > 0


def test_our_backend_is_selected_only_for_our_dtypes():
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    import torch

    def select(dtype, **kw):
        cfg = AttentionSelectorConfig(head_size=kw.get("head", 64), dtype=torch.bfloat16,
                                      kv_cache_dtype=dtype, block_size=None,
                                      use_mla=kw.get("mla", False), attn_type=kw.get("attn", "decoder"))
        return current_platform.get_attn_backend_cls(None, attn_selector_config=cfg)

    assert select("turboquant_3.5").endswith("TurboQuantBackend")
    assert not select("auto").endswith("TurboQuantBackend")
    with pytest.raises(ValueError, match="head_dim 96"):
        select("turboquant_3.5", head=96)
    with pytest.raises(ValueError, match="MLA"):
        select("turboquant_3.5", mla=True)
    with pytest.raises(ValueError, match="encoder"):
        select("turboquant_3.5", attn="encoder_only")
