"""TurboQuant KV-cache compression for vLLM 0.26 (arXiv 2504.19874).

`vllm_turboquant.codec` is the pure-PyTorch codec (no vLLM import); `vllm_turboquant.plugin`
registers the kv_cache_dtype strings with vLLM through the `vllm.general_plugins` entry point.
"""
__version__ = "0.1.0"
