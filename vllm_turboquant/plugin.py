"""vLLM general plugin entry point (group `vllm.general_plugins`, see pyproject.toml).

vLLM calls `register()` in every process it starts (API server, engine core, each worker) before
arguments are parsed, so everything here must be idempotent and cheap.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from .vllm_glue import registration, upstream_guards

    registration.register_dtypes()
    registration.register_backend()
    upstream_guards.install()
    _registered = True
