"""Lloyd-Max codebooks and TurboQuant_mse distortion match the paper."""
import pytest
import torch

from vllm_turboquant.codec import GroupQuantizer, lloyd_max_centroids

# Positive half of the centroids × √d in the Gaussian limit (TurboQuant paper / Lloyd-Max tables).
PUBLISHED = {
    1: [0.7979],
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3439, 2.1519],
    4: [0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326],
}
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.034, 4: 0.0095}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim,tol", [(128, 0.02), (4096, 0.001)])
def test_centroids_match_published_values(bits, dim, tol):
    c = lloyd_max_centroids(dim, bits) * dim**0.5
    positive = c[len(c) // 2:]
    torch.testing.assert_close(positive, torch.tensor(PUBLISHED[bits]), rtol=tol, atol=0)
    torch.testing.assert_close(c, -c.flip(0))  # symmetric


def test_codebook_scale_follows_the_rotated_dimension():
    # A 32-dim group's coordinates are twice as wide as a 128-dim one's: the table must follow.
    ratio = lloyd_max_centroids(32, 3)[-1] / lloyd_max_centroids(128, 3)[-1]
    assert 1.9 < ratio < 2.1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_normalised_mse_of_turboquant_mse_matches_paper(bits, gen):
    x = torch.randn(20000, 128, generator=gen)
    x = x / x.norm(dim=-1, keepdim=True)
    quant = GroupQuantizer(128, bits, norm_correction=False)
    codes, gamma = quant.quantize_rotated(quant.rotate(x))
    x_hat = quant.unrotate(quant.dequantize_rotated(codes, gamma))
    mse = ((x - x_hat) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.05)


def test_norm_correction_reconstructs_the_exact_norm(gen):
    x = torch.randn(1000, 96, generator=gen) * 3
    quant = GroupQuantizer(96, 3, norm_correction=True)
    codes, gamma = quant.quantize_rotated(quant.rotate(x))
    x_hat = quant.dequantize_rotated(codes, gamma)
    torch.testing.assert_close(x_hat.norm(dim=-1), x.norm(dim=-1), rtol=1e-3, atol=0)
