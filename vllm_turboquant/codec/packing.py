"""Bit-plane packing of small integer codes, as stored in the cache pages.

Codes of b bits for n channels occupy b planes of n/8 bytes: byte j of plane k holds bit k of the
codes of channels 8j..8j+7 (channel 8j+t in bit t). Every b in 1..8 packs to exactly b·n/8 bytes,
and a kernel unpacks channel c with one shift and mask per plane: (plane_k[c // 8] >> (c % 8)) & 1.
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes < 2**bits → [..., bits * n / 8] uint8."""
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"bit-plane packing needs a multiple of 8 channels, got {n}")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = _SHIFTS.to(codes.device)
    planes = [(((c >> k) & 1) << shifts).sum(-1, dtype=torch.uint8) for k in range(bits)]
    return torch.cat(planes, dim=-1)


def unpack_bitplanes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bitplanes: [..., bits * n / 8] uint8 → [..., n] uint8 codes."""
    planes = packed.reshape(*packed.shape[:-1], bits, n // 8, 1)
    b = (planes >> _SHIFTS.to(packed.device)) & 1  # [..., bits, n/8, 8]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.uint8)).view(bits, 1, 1)
    return (b * weights).sum(-3, dtype=torch.uint8).reshape(*packed.shape[:-1], n)


def pack_signs(signs_positive: torch.Tensor) -> torch.Tensor:
    """[..., n] bool (True = +1) → [..., n/8] uint8."""
    return pack_bitplanes(signs_positive.to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n/8] uint8 → [..., n] float32 in {-1, +1}."""
    return unpack_bitplanes(packed, 1, n).to(torch.float32) * 2 - 1
