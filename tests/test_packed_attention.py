"""Attention straight from packed pages equals decode-then-attend (fp32), for every format."""
import pytest
import torch

from vllm_turboquant.codec import FORMATS, LayerKVCodec, dense_attention, page_layout, paged_attention


def build_cache(codec, seq_lens, gen, num_blocks=40):
    """Write random K/V for each sequence into shuffled blocks; return block_table and dense K/V."""
    lay = codec.layout
    h, d, bs = lay.num_kv_heads, lay.head_dim, lay.block_size
    cache = torch.zeros(num_blocks, lay.page_bytes, dtype=torch.uint8)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max((n + bs - 1) // bs for n in seq_lens)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    dense = []
    for i, n in enumerate(seq_lens):
        blocks = [free.pop() for _ in range((n + bs - 1) // bs)]
        table[i, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, h, d, generator=gen) * 2 + 0.5  # off-centre, like real keys
        v = torch.randn(n, h, d, generator=gen)
        slots = torch.tensor(blocks).repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs
        codec.write(cache, slots, k, v)
        dense.append((k, v))
    return cache, table, dense


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,gqa", [(64, 3), (128, 4), (256, 1)])
def test_packed_attention_equals_decode_then_attend(name, d, gqa, gen):
    h = 2
    codec = LayerKVCodec(page_layout(name, d, 16, h))
    seq_lens = [1, 17, 50, 33]
    q_lens = [1, 5, 50, 1]  # decode, chunked prefill over cached context, full prefill, decode
    cache, table, dense = build_cache(codec, seq_lens, gen)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    query = torch.randn(int(qsl[-1]), h * gqa, d, generator=gen)
    scale = d ** -0.5
    out = paged_attention(codec, query, cache, table, torch.tensor(seq_lens), qsl, scale)
    for i, n in enumerate(seq_lens):
        blocks = table[i, : (n + 15) // 16]
        k_hat, v_hat = codec.read_tokens(cache, blocks, n)
        want = dense_attention(query[qsl[i]: qsl[i + 1]], k_hat, v_hat, scale)
        torch.testing.assert_close(out[qsl[i]: qsl[i + 1]], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,bound", [("turboquant_3.5_mse", 0.25), ("turboquant_2.5_mse", 0.45)])
def test_packed_attention_is_close_to_exact_attention(name, bound, gen):
    codec = LayerKVCodec(page_layout(name, 128, 16, 2))
    cache, table, dense = build_cache(codec, [200], gen)
    q = torch.randn(8, 8, 128, generator=gen) * 0.3
    out = paged_attention(codec, q, cache, table, torch.tensor([200]), torch.tensor([0, 8]), 128 ** -0.5)
    k, v = dense[0]
    exact = dense_attention(q, k, v, 128 ** -0.5)
    assert ((out - exact).norm() / exact.norm()).item() < bound


def test_sliding_window_and_causal_masks(gen):
    codec = LayerKVCodec(page_layout("turboquant_3.5", 64, 16, 1))
    cache, table, dense = build_cache(codec, [40], gen)
    q = torch.randn(3, 2, 64, generator=gen)
    out = paged_attention(codec, q, cache, table, torch.tensor([40]), torch.tensor([0, 3]), 0.125,
                          sliding_window=8)
    k_hat, v_hat = codec.read_tokens(cache, table[0, :3], 40)
    torch.testing.assert_close(out, dense_attention(q, k_hat, v_hat, 0.125, sliding_window=8),
                               rtol=1e-5, atol=1e-5)
    # The last query (position 39) sees exactly positions 32..39.
    last = dense_attention(q[2:], k_hat[32:], v_hat[32:], 0.125, causal=False)
    torch.testing.assert_close(out[2:], last, rtol=1e-5, atol=1e-5)


def test_sliding_window_never_reads_blocks_before_the_window(gen):
    # vLLM frees blocks that slid out of the window (they may be reused or hold garbage).
    codec = LayerKVCodec(page_layout("turboquant_3.5", 64, 16, 1))
    cache, table, dense = build_cache(codec, [70], gen)
    q = torch.randn(1, 2, 64, generator=gen)
    want = paged_attention(codec, q, cache, table, torch.tensor([70]), torch.tensor([0, 1]), 0.125,
                           sliding_window=20)
    cache[table[0, :3].long()] = 0xFF  # positions 0..47 become NaN norms / junk codes
    got = paged_attention(codec, q, cache, table, torch.tensor([70]), torch.tensor([0, 1]), 0.125,
                          sliding_window=20)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
