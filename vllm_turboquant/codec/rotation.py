"""Seeded random rotations and the QJL projection.

All matrices are drawn on the CPU in float64 from a torch.Generator, so every process (API server,
engine core, each worker, a test) derives bit-identical matrices from (seed, purpose, dim).
"""
from __future__ import annotations

import functools
import math

import torch

DEFAULT_SEED = 20250426  # arXiv 2504.19874


def _generator(seed: int, purpose: str, dim: int) -> torch.Generator:
    # Distinct, stable streams per (seed, purpose, dim); Python's hash() is salted, so mix by hand.
    mixed = seed
    for ch in f"{purpose}:{dim}":
        mixed = (mixed * 1_000_003 + ord(ch)) % (1 << 62)
    return torch.Generator().manual_seed(mixed)


@functools.lru_cache(maxsize=None)
def _haar_orthogonal(dim: int, seed: int, purpose: str) -> torch.Tensor:
    g = torch.randn(dim, dim, generator=_generator(seed, purpose, dim), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Sign fix makes Q Haar-distributed (plain QR is biased towards R's sign convention).
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def random_rotation(dim: int, seed: int = DEFAULT_SEED, purpose: str = "rotation") -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] matrix (float64); rotate a row vector x as x @ R.T."""
    return _haar_orthogonal(dim, seed, purpose)


def qjl_matrix(dim: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The QJL projection S: a Haar-random orthogonal [dim, dim] matrix (rows s_i, float64)."""
    return _haar_orthogonal(dim, seed, "qjl")


@functools.lru_cache(maxsize=None)
def qjl_constant(dim: int) -> float:
    """C with E_S[C · ||r|| · <S y, sign(S r)>] = <y, r> for S Haar-orthogonal.

    Each row s of S is uniform on the unit sphere, so E[s · sign(<s, r>)] = E|s_1| · r/||r|| and
    E[<s, y> sign(<s, r>)] = E|s_1| <y, r>/||r||. Summing the d rows gives d · E|s_1| · <y, r>/||r||,
    hence C = 1 / (d · E|s_1|) with E|s_1| = Γ(d/2) / (√π · Γ((d+1)/2)) exactly. For large d this is
    √(π/2)/√d (the asymptotic constant is 0.4% too small at d=64, a bias the unbiasedness test sees).
    """
    mean_abs = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (dim * mean_abs)
