"""Which channels of each KV head are the "outliers" that get the extra bit.

A channel split is a permutation perm [H, d] per (layer, K or V): perm[h, :n_o] are the outlier
channels of head h and perm[h, n_o:] the regular ones, each ascending. It is fixed once, from the
calibration tokens (the engine-start prompt, or the first keys/values the layer writes): largest
per-channel energy over those tokens, centred where the key mean is removed, ties broken by the
lower index. It must never change while pages written with it are alive.

Before any vector has been observed, `default_split` is used: the n_o/2 lowest-frequency RoPE pairs
of the rotate-half (NeoX/Llama) layout, i.e. channels [d/2 - n_o/2, d/2) and [d - n_o/2, d). Those
rotate slowest and carry the large, persistent key components in most RoPE models.
"""
from __future__ import annotations

import torch

from .formats import split_sizes


def _perm_from_outliers(outlier_mask: torch.Tensor) -> torch.Tensor:
    """bool [H, d] with n_o True per row → perm [H, d] (outliers ascending, then regulars ascending)."""
    d = outlier_mask.shape[-1]
    idx = torch.arange(d, device=outlier_mask.device).expand_as(outlier_mask)
    # Sort key: outliers first, then by channel index; stable and deterministic.
    key = (~outlier_mask).long() * d + idx
    return torch.argsort(key, dim=-1).to(torch.int64)


def default_split(head_dim: int, num_heads: int) -> torch.Tensor:
    n_o, _ = split_sizes(head_dim)
    half = head_dim // 2
    mask = torch.zeros(head_dim, dtype=torch.bool)
    mask[half - n_o // 2: half] = True
    mask[head_dim - n_o // 2:] = True
    return _perm_from_outliers(mask.expand(num_heads, head_dim))


def split_from_energy(energy: torch.Tensor) -> torch.Tensor:
    """energy [H, d] (e.g. sum of squares per channel) → perm [H, d] with the top n_o as outliers."""
    num_heads, head_dim = energy.shape
    n_o, _ = split_sizes(head_dim)
    # Stable descending order: among equal energies the lower channel index wins.
    order = torch.sort(energy.double().cpu(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(num_heads, head_dim, dtype=torch.bool)
    mask.scatter_(-1, order[:, :n_o], True)
    return _perm_from_outliers(mask)


def split_from_vectors(x: torch.Tensor) -> torch.Tensor:
    """Observed vectors [N, H, d] → perm [H, d] (largest L2 norm per channel over the N tokens)."""
    return split_from_energy(x.float().pow(2).sum(dim=0))
