"""The Triton cache write against the codec's write (the oracle): same pages, up to codes that sit
on a bucket boundary (float summation order), and the same attention read back."""
import pytest
import torch

from vllm_turboquant.codec import FORMATS, LayerKVCodec, page_layout, paged_attention
from vllm_turboquant.kernels.cache_write import write_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,heads", [(64, 2), (128, 1), (256, 1)])
def test_write_kernel_matches_the_codec(name, d, heads, gen):
    lay = page_layout(name, d, 16, heads)
    codec = LayerKVCodec(lay)
    k = torch.randn(40, heads, d, generator=gen) * 2 + 0.5
    v = torch.randn(40, heads, d, generator=gen)
    codec.calibrate(k, v)
    slots = torch.randperm(4 * 16, generator=gen)[:40]
    slots[[3, 17]] = -1  # padding
    want = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    codec.write(want, slots, k, v)
    got = torch.zeros(4, lay.page_bytes, dtype=torch.uint8, device=DEVICE)
    write_kv(codec, got, slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
    got = got.cpu()
    assert (got != want).float().mean().item() < 0.01
    # Everything read back through attention agrees with the oracle's pages.
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    q = torch.randn(1, heads * 2, d, generator=gen)
    args = (table, torch.tensor([64]), torch.tensor([0, 1]), d ** -0.5)
    a = paged_attention(codec, q, want, *args)
    b = paged_attention(codec, q, got, *args)
    assert ((a - b).norm() / a.norm()).item() < 1e-2
