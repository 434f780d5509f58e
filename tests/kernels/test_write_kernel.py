"""The Triton cache write against the codec's write (the oracle): same pages, up to codes that sit
on a bucket boundary (float summation order), and the same attention read back."""
import pytest
import torch

from vllm_turboquant.codec import FORMATS, LayerKVCodec, page_layout, paged_attention
from vllm_turboquant.kernels.cache_write import write_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,heads", [(64, 2), (128, 1), (256, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kernel_matches_the_codec(name, d, heads, dtype, gen):
    """fp32 inputs take the kernel's three-dot rotation, 16-bit ones (exact in TF32) two dots."""
    lay = page_layout(name, d, 16, heads)
    codec = LayerKVCodec(lay)
    k = (torch.randn(40, heads, d, generator=gen) * 2 + 0.5).to(dtype)
    v = torch.randn(40, heads, d, generator=gen).to(dtype)
    codec.calibrate(k.float(), v.float())
    slots = torch.randperm(4 * 16, generator=gen)[:40]
    slots[[3, 17]] = -1  # padding
    want = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    codec.write(want, slots, k.float(), v.float())
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


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_2.5_mse"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_write_kernel_stages_the_newest_tokens_like_the_codec(name, d, gen):
    from vllm_turboquant.codec import RecentTokens

    codec = LayerKVCodec(page_layout(name, d, 16, 2))
    codec.calibrate(torch.randn(32, 2, d, generator=gen) * 2 + 0.3, torch.randn(32, 2, d, generator=gen))
    k, v = torch.randn(40, 2, d, generator=gen) * 2, torch.randn(40, 2, d, generator=gen)
    slots = torch.randperm(64, generator=gen)[:40]
    slots[20] = -1  # padding
    qsl = torch.tensor([0, 30, 40], dtype=torch.int32)  # a chunk ending at 49, a fresh prompt
    lens = torch.tensor([50, 10], dtype=torch.int32)
    want_cache = torch.zeros(4, codec.layout.page_bytes, dtype=torch.uint8)
    want = RecentTokens(rows=2, window=16, num_kv_heads=2, head_dim=d)
    entries = want.entries(slots, qsl, lens)
    codec.write(want_cache, slots, k, v)
    want.write(codec, want_cache, slots, entries, k, v)
    got_cache = torch.zeros(4, codec.layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    got = RecentTokens(rows=2, window=16, num_kv_heads=2, head_dim=d, device=DEVICE)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    write_kv(codec, got_cache, on(slots), on(k), on(v), got, on(entries))
    tag = got.tag.cpu()
    assert torch.equal(tag[..., 0], want.tag[..., 0])  # same slots
    # same norms as on the pages (up to the rare code on a bucket boundary, as above)
    assert (tag[..., 1] == want.tag[..., 1]).float().mean().item() >= 0.95
    torch.testing.assert_close(got.key.cpu(), want.key, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.value.cpu(), want.value, rtol=2e-3, atol=2e-3)


def test_repeated_writes_follow_their_arguments(gen):
    """Steps after the first launch their variant directly (kernels/launch.py): a step whose
    arguments Triton would specialize differently (slots at an odd offset, keys in another
    dtype) must still write what the codec writes, and so must the next aligned step."""
    lay = page_layout("turboquant_3.5_mse", 64, 16, 2)
    codec = LayerKVCodec(lay)
    k = torch.randn(48, 2, 64, generator=gen) * 2 + 0.5
    v = torch.randn(48, 2, 64, generator=gen)
    codec.calibrate(k, v)
    slots = torch.randperm(4 * 16, generator=gen)[:49]
    want = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    got = torch.zeros(4, lay.page_bytes, dtype=torch.uint8, device=DEVICE)
    dev_slots = slots.to(DEVICE)
    steps = [(slice(0, 16), dev_slots[:16], torch.bfloat16),       # aligned: resolves the variant
             (slice(16, 32), dev_slots[17:33], torch.bfloat16),    # slots 8 bytes off alignment
             (slice(32, 40), dev_slots[33:41], torch.float16),     # another key dtype
             (slice(40, 48), dev_slots[41:49].clone(), torch.bfloat16)]  # aligned again
    for rows, s, dtype in steps:
        k_in, v_in = k[rows].to(dtype), v[rows].to(dtype)  # the model's dtype, for both writers
        codec.write(want, s.cpu(), k_in.float(), v_in.float())
        write_kv(codec, got, s, k_in.to(DEVICE), v_in.to(DEVICE))
    assert (got.cpu() != want).float().mean().item() < 0.01


def test_write_kernel_reads_k_and_v_in_place_from_the_fused_qkv_projection(gen):
    # vLLM hands the backend K and V as views into one [N, (Hq + 2 Hkv) · d] QKV tensor: the
    # kernel reads them at their token stride, and writes the same pages as from copies.
    name, d, heads = "turboquant_3.5", 64, 2
    codec = LayerKVCodec(page_layout(name, d, 16, heads))
    qkv = torch.randn(40, (4 + 2) * heads * d, generator=gen)
    k = qkv[:, 4 * heads * d: 5 * heads * d].view(40, heads, d)
    v = qkv[:, 5 * heads * d:].view(40, heads, d)
    assert not k.is_contiguous()
    codec.calibrate(k.contiguous(), v.contiguous())
    slots = torch.randperm(64, generator=gen)[:40]
    pages = [torch.zeros(4, codec.layout.page_bytes, dtype=torch.uint8, device=DEVICE)
             for _ in range(2)]
    on = lambda t: t.to(DEVICE)  # noqa: E731
    qkv_dev = on(qkv)
    k_dev = qkv_dev[:, 4 * heads * d: 5 * heads * d].view(40, heads, d)
    v_dev = qkv_dev[:, 5 * heads * d:].view(40, heads, d)
    write_kv(codec, pages[0], on(slots), k_dev, v_dev)
    write_kv(codec, pages[1], on(slots), k_dev.contiguous(), v_dev.contiguous())
    assert torch.equal(pages[0], pages[1])
