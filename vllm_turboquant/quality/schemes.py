"""KV-cache quantization schemes compared in the quality benchmarks, as round trips on dense K/V.

Each scheme makes one quantizer per layer; `calibrate` sees the layer's first K/V (as the vLLM
backend does at its first write) and `roundtrip` returns what attention would read back.
Tensors are [N, H, d].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..codec import (FORMATS, LayerKVCodec, default_split, lloyd_max_centroids, page_layout,
                     random_rotation)


class LayerQuantizer:
    def calibrate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        pass

    def roundtrip(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Scheme:
    name: str

    def bytes_per_token_head(self, head_dim: int) -> int:
        raise NotImplementedError

    def layer(self, head_dim: int, num_kv_heads: int) -> LayerQuantizer:
        raise NotImplementedError


# --- bf16 (the reference cache) -------------------------------------------------------------------
class _Bf16(LayerQuantizer):
    def roundtrip(self, key, value):
        return key.to(torch.bfloat16).float(), value.to(torch.bfloat16).float()


@dataclass(frozen=True)
class Bf16(Scheme):
    name: str = "bf16"

    def bytes_per_token_head(self, head_dim):
        return 4 * head_dim

    def layer(self, head_dim, num_kv_heads):
        return _Bf16()


# --- ours -----------------------------------------------------------------------------------------
class _TurboQuant(LayerQuantizer):
    def __init__(self, codec: LayerKVCodec, calibrate_outliers: bool = True):
        self.codec, self.calibrate_outliers = codec, calibrate_outliers

    def calibrate(self, key, value):
        self.codec.calibrate(key, value)
        if not self.calibrate_outliers:  # ablation: keep the data-free default split
            lay = self.codec.layout
            self.codec.key_perm = default_split(lay.head_dim, lay.num_kv_heads).to(key.device)
            self.codec.value_perm = default_split(lay.head_dim, lay.num_kv_heads).to(key.device)

    def roundtrip(self, key, value):
        return self.codec.decode(self.codec.encode(key, value))


@dataclass(frozen=True)
class TurboQuant(Scheme):
    """One of our formats; the defaults are the serving defaults (see LayerKVCodec)."""

    format: str = "turboquant_3.5"
    qjl_decode: str = "min_mse"
    center_keys: bool = True
    calibrate_outliers: bool = True

    def bytes_per_token_head(self, head_dim):
        return FORMATS[self.format].bytes_per_token_head(head_dim)

    def layer(self, head_dim, num_kv_heads):
        lay = page_layout(self.format, head_dim, 16, num_kv_heads)
        codec = LayerKVCodec(lay, qjl_decode=self.qjl_decode, center_keys=self.center_keys)
        return _TurboQuant(codec, self.calibrate_outliers)


def paper_recipe(fmt: str) -> TurboQuant:
    """The paper's recipe as published: unbiased QJL decode, no mean removal."""
    return TurboQuant(f"{fmt} (paper)", fmt, qjl_decode="unbiased", center_keys=False)


# --- FP8 e4m3 with one scale per tensor -------------------------------------------------------------
class _Fp8(LayerQuantizer):
    def __init__(self, fixed_scale: float | None):
        self.k_scale = self.v_scale = fixed_scale

    def calibrate(self, key, value):
        if self.k_scale is None:  # per-tensor amax scale from the calibration tokens
            self.k_scale = key.abs().max().item() / 448.0
            self.v_scale = value.abs().max().item() / 448.0

    @staticmethod
    def _q(x, s):
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s

    def roundtrip(self, key, value):
        return self._q(key, self.k_scale), self._q(value, self.v_scale)


@dataclass(frozen=True)
class Fp8(Scheme):
    name: str = "fp8_e4m3"
    fixed_scale: float | None = None  # None: per-tensor amax scale; vLLM's default is 1.0

    def bytes_per_token_head(self, head_dim):
        return 2 * head_dim

    def layer(self, head_dim, num_kv_heads):
        return _Fp8(self.fixed_scale)


# --- like upstream vLLM's turboquant_4bit_nc ------------------------------------------------------
def _hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


class _Upstream4bitNC(LayerQuantizer):
    """Hadamard (random signs) + 4-bit Lloyd-Max keys with norm correction; 4-bit uniform values
    with an fp16 scale and zero point per vector; no outlier split, no QJL."""

    def __init__(self, head_dim: int):
        signs = torch.sign(random_rotation(head_dim, purpose="upstream_signs")[0]).float()
        self.rot = _hadamard(head_dim) * signs  # x_rot = x @ rot.T is orthogonal
        self.centroids = lloyd_max_centroids(head_dim, 4)

    def roundtrip(self, key, value):
        norm = key.norm(dim=-1, keepdim=True)
        unit = (key.float() / norm.clamp_min(1e-30)) @ self.rot.T
        idx = torch.bucketize(unit, (self.centroids[1:] + self.centroids[:-1]) / 2)
        c = self.centroids[idx]
        gamma = (norm / c.norm(dim=-1, keepdim=True)).half().float()
        k_hat = (c * gamma) @ self.rot
        lo, hi = value.amin(-1, keepdim=True), value.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8).half().float()
        lo = lo.half().float()
        v_hat = torch.round((value - lo) / scale).clamp(0, 15) * scale + lo
        return k_hat, v_hat


@dataclass(frozen=True)
class Upstream4bitNC(Scheme):
    name: str = "upstream_4bit_nc_like"

    def bytes_per_token_head(self, head_dim):
        return (head_dim // 2 + 2) + (head_dim // 2 + 4)

    def layer(self, head_dim, num_kv_heads):
        return _Upstream4bitNC(head_dim)


def standard_schemes() -> list[Scheme]:
    return [Fp8(), Upstream4bitNC()] + [TurboQuant(n, n) for n in FORMATS]


def benchmark_schemes() -> list[Scheme]:
    """Baselines, the paper's recipe and our serving defaults for every format, and ablations."""
    out: list[Scheme] = [Fp8("fp8_e4m3 (amax scale)"), Fp8("fp8_e4m3 (scale 1, vLLM)", 1.0),
                         Upstream4bitNC()]
    for fmt in FORMATS:
        out += [paper_recipe(fmt), TurboQuant(fmt, fmt)]
    out.append(TurboQuant("turboquant_3.5_mse (default outlier split)", "turboquant_3.5_mse",
                          calibrate_outliers=False))
    out.append(TurboQuant("turboquant_3.5 (unbiased QJL, centred)", "turboquant_3.5",
                          qjl_decode="unbiased"))
    return out
