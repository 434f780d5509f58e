"""TurboQuant_mse and TurboQuant_prod on head vectors split into outlier and regular channels.

Data flow for one vector x of head_dim d (per KV head h, with that head's channel split):
    rotate:   x_rot = [R_o · x[outliers], R_r · x[regulars]]          (orthogonal: <q,x> = <q_rot,x_rot>)
    MSE:      codes_g = argmin_c |x_rot_g/||x_g|| - c|, gamma_g = ||x_g|| / ||c[codes_g]||   (norm correction)
    prod:     r = x_rot - x̃_rot, signs = sign(S · r), rnorm = ||r||
    estimate: <q, x> ≈ <q_rot, x̃_rot> + C · rnorm · <S · q_rot, signs>
The decode constant C is a choice made at read time (the stored bits are the same):
    "unbiased": C = qjl_constant(d) ≈ √(π/2)/√d — the paper's unbiased estimator;
    "min_mse":  C = 1/(d · qjl_constant(d)) ≈ √(2/π)/√d — E[r | signs] for isotropic r, i.e. the
                unbiased term shrunk by ≈ 2/π. Lower variance, lower attention error (measured in
                bench/codec_quality.py), so the serving default.
Everything is computed in float32 on the tensors' device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .codebook import lloyd_max_centroids
from .formats import TensorFormat, split_sizes
from .rotation import DEFAULT_SEED, qjl_constant, qjl_matrix, random_rotation

FP16_MAX = 65504.0


class GroupQuantizer:
    """TurboQuant_mse for vectors of one dimension: seeded rotation + Lloyd-Max codebook + norm."""

    def __init__(self, dim: int, bits: int, seed: int = DEFAULT_SEED, purpose: str = "rotation",
                 norm_correction: bool = True):
        self.dim, self.bits, self.norm_correction = dim, bits, norm_correction
        self.rotation = random_rotation(dim, seed, purpose).to(torch.float32)
        self.centroids = lloyd_max_centroids(dim, bits)
        self.boundaries = (self.centroids[1:] + self.centroids[:-1]) / 2

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation.to(x.device).T

    def unrotate(self, x_rot: torch.Tensor) -> torch.Tensor:
        return x_rot @ self.rotation.to(x_rot.device)

    def quantize_rotated(self, x_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated vectors [..., dim] → (codes uint8 [..., dim], gamma fp16 [...])."""
        norm = x_rot.norm(dim=-1)
        unit = x_rot / norm.clamp_min(1e-30).unsqueeze(-1)
        codes = torch.bucketize(unit, self.boundaries.to(x_rot.device)).to(torch.uint8)
        if self.norm_correction:
            c_norm = self.centroids.to(x_rot.device)[codes.long()].norm(dim=-1)
            gamma = norm / c_norm
        else:
            gamma = norm
        return codes, gamma.clamp(max=FP16_MAX).to(torch.float16)

    def dequantize_rotated(self, codes: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self.centroids.to(codes.device)[codes.long()] * gamma.float().unsqueeze(-1)


@dataclass
class QuantizedVectors:
    """Unpacked fields of quantized vectors [..., H, *]: what one K or V page region holds."""

    codes_o: torch.Tensor  # uint8 [..., H, n_o]
    codes_r: torch.Tensor  # uint8 [..., H, n_r]
    gamma_o: torch.Tensor  # fp16 [..., H]
    gamma_r: torch.Tensor  # fp16 [..., H]
    signs: torch.Tensor | None = None  # bool [..., H, d], True = +1   (prod only)
    rnorm: torch.Tensor | None = None  # fp16 [..., H]                (prod only)


QJL_DECODES = ("unbiased", "min_mse")


def qjl_decode_scale(head_dim: int, mode: str) -> float:
    if mode == "unbiased":
        return qjl_constant(head_dim)
    if mode == "min_mse":
        return 1.0 / (head_dim * qjl_constant(head_dim))
    raise ValueError(f"qjl_decode must be one of {QJL_DECODES}, got {mode!r}")


class TensorCodec:
    """Encodes K or V vectors of one head_dim in one TensorFormat."""

    def __init__(self, fmt: TensorFormat, head_dim: int, seed: int = DEFAULT_SEED, tag: str = "k",
                 norm_correction: bool = True, qjl_decode: str = "unbiased"):
        self.fmt, self.head_dim = fmt, head_dim
        self.n_o, self.n_r = split_sizes(head_dim)
        self.outlier = GroupQuantizer(self.n_o, fmt.outlier_bits, seed, f"{tag}_outlier", norm_correction)
        self.regular = GroupQuantizer(self.n_r, fmt.regular_bits, seed, f"{tag}_regular", norm_correction)
        if fmt.has_qjl:
            self.qjl = qjl_matrix(head_dim, seed).to(torch.float32)
            self.qjl_scale = qjl_decode_scale(head_dim, qjl_decode)

    # --- the orthogonal map between the original and the rotated domain -------------------------
    def rotate(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """x [..., H, d] in the original channel order → [..., H, d] rotated ([outliers | regulars])."""
        xp = torch.gather(x.float(), -1, perm.to(x.device).expand(*x.shape))
        return torch.cat([self.outlier.rotate(xp[..., : self.n_o]),
                          self.regular.rotate(xp[..., self.n_o:])], dim=-1)

    def unrotate(self, x_rot: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        xp = torch.cat([self.outlier.unrotate(x_rot[..., : self.n_o]),
                        self.regular.unrotate(x_rot[..., self.n_o:])], dim=-1)
        return torch.empty_like(xp).scatter_(-1, perm.to(xp.device).expand(*xp.shape), xp)

    # --- encode / decode ------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, perm: torch.Tensor) -> QuantizedVectors:
        """x [..., H, d] (any float dtype), perm [H, d] (outlier channels first) → fields."""
        x_rot = self.rotate(x, perm)
        codes_o, gamma_o = self.outlier.quantize_rotated(x_rot[..., : self.n_o])
        codes_r, gamma_r = self.regular.quantize_rotated(x_rot[..., self.n_o:])
        q = QuantizedVectors(codes_o, codes_r, gamma_o, gamma_r)
        if self.fmt.has_qjl:
            residual = x_rot - self.mse_rotated(q)
            q.signs = residual @ self.qjl.to(x.device).T >= 0
            q.rnorm = residual.norm(dim=-1).clamp(max=FP16_MAX).to(torch.float16)
        return q

    def mse_rotated(self, q: QuantizedVectors) -> torch.Tensor:
        """The MSE-stage reconstruction in the rotated domain, [..., H, d] float32."""
        return torch.cat([self.outlier.dequantize_rotated(q.codes_o, q.gamma_o),
                          self.regular.dequantize_rotated(q.codes_r, q.gamma_r)], dim=-1)

    def qjl_rotated(self, q: QuantizedVectors) -> torch.Tensor:
        """The QJL residual estimate C·||r||·Sᵀ·signs in the rotated domain, [..., H, d]."""
        signs = q.signs.float() * 2 - 1
        return (self.qjl_scale * q.rnorm.float()).unsqueeze(-1) * (signs @ self.qjl.to(signs.device))

    def dequantize_rotated(self, q: QuantizedVectors) -> torch.Tensor:
        x = self.mse_rotated(q)
        return x + self.qjl_rotated(q) if self.fmt.has_qjl else x

    def dequantize(self, q: QuantizedVectors, perm: torch.Tensor) -> torch.Tensor:
        """Fields → vectors [..., H, d] float32 in the original channel order.

        For prod keys this includes the QJL term, so <q, dequantize(x)> is exactly the estimator.
        """
        return self.unrotate(self.dequantize_rotated(q), perm)


@functools.lru_cache(maxsize=None)
def tensor_codec(fmt: TensorFormat, head_dim: int, seed: int = DEFAULT_SEED, tag: str = "k",
                 norm_correction: bool = True, qjl_decode: str = "unbiased") -> TensorCodec:
    """Shared, cached TensorCodec (rotations and codebooks are built once per process)."""
    return TensorCodec(fmt, head_dim, seed, tag, norm_correction, qjl_decode)
