"""TurboQuant_prod keys give unbiased inner products, and the test notices a wrong constant."""
import math

import torch

from vllm_turboquant.codec import TensorCodec, TensorFormat, default_split

D = 128
S_DRAWS, PAIRS_PER_S = 256, 512  # 131,072 (x, y) pairs over 256 independent QJL matrices


def _haar(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, D, D, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def inner_product_bias_zscore(constant: float | None = None) -> float:
    """Mean error of the prod estimate of <y, x> in standard errors, over random S and pairs.

    The pairs are correlated (y ≈ x + noise) so <y, r> has a non-zero mean and any mis-scaled QJL
    term shows up as a systematic bias rather than averaging away.
    """
    g = torch.Generator().manual_seed(7)
    codec = TensorCodec(TensorFormat("prod", 3, 2), D)
    if constant is not None:
        codec.qjl_scale = constant
    perm = default_split(D, 1)
    errors = []
    for s in _haar(S_DRAWS, g):
        codec.qjl = s
        x = torch.randn(PAIRS_PER_S, 1, D, generator=g)
        y = x + torch.randn(PAIRS_PER_S, 1, D, generator=g)
        estimate = (y * codec.dequantize(codec.quantize(x, perm), perm)).sum(-1)
        errors.append(estimate - (y * x).sum(-1))
    e = torch.cat(errors).double().flatten()
    return (e.mean() / (e.std() / math.sqrt(e.numel()))).item()


def test_prod_estimator_is_unbiased():
    assert abs(inner_product_bias_zscore()) < 3


def test_wrong_qjl_constant_is_detected():
    # The Gaussian-S constant √(π/2)/d used with orthonormal S shrinks the QJL term √d-fold.
    assert abs(inner_product_bias_zscore(math.sqrt(math.pi / 2) / D)) > 3
    # Even 3% too large is caught.
    assert abs(inner_product_bias_zscore(1.03 * TensorCodec(TensorFormat("prod", 3, 2), D).qjl_scale)) > 3


def test_qjl_reduces_inner_product_error_variance_only_through_the_residual(gen):
    # The QJL term must be live: dropping it changes the estimate (the quant.cpp failure mode).
    codec = TensorCodec(TensorFormat("prod", 3, 2), D)
    perm = default_split(D, 1)
    x = torch.randn(256, 1, D, generator=gen)
    q = codec.quantize(x, perm)
    assert (codec.qjl_rotated(q).norm(dim=-1) > 0.1 * (x - codec.unrotate(codec.mse_rotated(q), perm)).norm(dim=-1)).all()
