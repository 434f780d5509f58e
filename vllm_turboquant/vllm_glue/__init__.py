"""Glue between vLLM 0.26 and the codec: dtype registration, upstream guards, the attention backend.

Data flows one way: vLLM → this package → `vllm_turboquant.codec` (and `vllm_turboquant.kernels`).
"""
