"""Teacher-forced simulation in transformers: every cached post-RoPE K/V goes through a scheme.

One forward pass over a window quantizes the K/V of every position (including the query's own), so
each token attends to earlier tokens exactly as a decode step reads them from the compressed cache;
queries stay exact. This is the codec-only prediction that the vLLM integration is held to.

`exact_recent_block=B` simulates keeping each sequence's newest, not-yet-full block of B tokens
exact (bf16): a query at position t reads exact K/V for positions in its own block
[t - t % B, t] and quantized K/V for earlier blocks.

`fresh_prefill_tokens=n` mirrors vLLM's first prefill chunk: the first n positions attend to each
other's exact K/V (a fresh prefill with no cached context never reads the cache), later positions
attend to everything through the quantized cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schemes import LayerQuantizer, Scheme

ATTN_NAME = "turboquant_sim"


@dataclass
class _State:
    layers: dict[int, LayerQuantizer] | None = None
    scheme: Scheme | None = None
    calib_tokens: int = 64
    fresh_prefill_tokens: int = 0
    exact_recent_block: int = 0
    capture: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    calibrated: set[int] = field(default_factory=set)


_STATE = _State()


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = module.layer_idx
    if _STATE.capture is not None:  # [B, H, L, d] → [L, H, d] of batch row 0
        _STATE.capture[layer] = tuple(t[0].transpose(0, 1).float().clone() for t in (query, key, value))
    if _STATE.scheme is not None:
        exact_key, exact_value = key, value
        b, h, length, d = key.shape
        quant = _STATE.layers.setdefault(layer, _STATE.scheme.layer(d, h))
        k = key.transpose(1, 2).reshape(b * length, h, d).float()
        v = value.transpose(1, 2).reshape(b * length, h, d).float()
        if layer not in _STATE.calibrated:
            n = min(_STATE.calib_tokens, length)
            quant.calibrate(k[:n], v[:n])
            _STATE.calibrated.add(layer)
        k, v = quant.roundtrip(k, v)
        key = k.view(b, length, h, d).transpose(1, 2).to(key.dtype)
        value = v.view(b, length, h, d).transpose(1, 2).to(value.dtype)
        if _STATE.exact_recent_block:
            return _mixed_attention(module, query, exact_key, exact_value, key, value,
                                    _STATE.exact_recent_block)
        n = min(_STATE.fresh_prefill_tokens, length)
        if n:
            out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            mask = None if attention_mask is None else attention_mask[..., :n, :n]
            fresh, _ = sdpa_attention_forward(module, query[:, :, :n], exact_key[:, :, :n],
                                              exact_value[:, :, :n], mask, **kwargs)
            out = out.clone()
            out[:, :n] = fresh  # sdpa returns [B, L, H, d]
            return out, weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _mixed_attention(module, query, k_exact, v_exact, k_quant, v_quant, block: int):
    """Causal attention where each query reads its own (newest) block exactly, older ones quantized."""
    import math

    b, hq, length, d = query.shape
    rep = hq // k_exact.shape[1]
    ke, ve, kq, vq = (t.repeat_interleave(rep, dim=1).float() for t in (k_exact, v_exact, k_quant, v_quant))
    q = query.float() * module.scaling
    pos = torch.arange(length)
    same_block = (pos.view(-1, 1) // block) == (pos.view(1, -1) // block)
    causal = pos.view(1, -1) <= pos.view(-1, 1)
    scores = torch.where(same_block, q @ ke.transpose(-1, -2), q @ kq.transpose(-1, -2))
    p = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    out = (p * same_block) @ ve + (p * ~same_block) @ vq
    return out.transpose(1, 2).to(query.dtype), None


def load_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    AttentionInterface.register(ATTN_NAME, _attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_NAME)
    return model.eval(), AutoTokenizer.from_pretrained(path)


class Simulation:
    """Holds one scheme's per-layer quantizers (calibrated once, on the first window it sees)."""

    def __init__(self, model, scheme: Scheme | None, calib_tokens: int = 64,
                 fresh_prefill_tokens: int = 0, exact_recent_block: int = 0):
        self.model, self.scheme, self.calib_tokens = model, scheme, calib_tokens
        self.fresh_prefill_tokens = fresh_prefill_tokens
        self.exact_recent_block = exact_recent_block
        self.layers: dict[int, LayerQuantizer] = {}
        self.calibrated: set[int] = set()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        _STATE.scheme, _STATE.layers, _STATE.calibrated = self.scheme, self.layers, self.calibrated
        _STATE.calib_tokens = self.calib_tokens
        _STATE.fresh_prefill_tokens = self.fresh_prefill_tokens
        _STATE.exact_recent_block = self.exact_recent_block
        try:
            return self.model(torch.tensor([ids])).logits[0].float()
        finally:
            _STATE.scheme = None


@torch.no_grad()
def capture_qkv(model, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE (query, key, value) per layer, each [L, heads, d], for one window."""
    _STATE.capture = {}
    try:
        model(torch.tensor([ids]))
        return _STATE.capture
    finally:
        _STATE.capture = None
