"""The Triton attention kernel against the codec's paged attention (the oracle).

On CPU these run under Triton's interpreter (TRITON_INTERPRET=1, tiny shapes), launched by
tests/test_kernels_interpreted.py; on a GPU machine run `pytest tests/kernels` directly."""
import pytest
import torch

pytest.importorskip("triton")

from vllm_turboquant.codec import FORMATS, LayerKVCodec, page_layout, paged_attention  # noqa: E402
from vllm_turboquant.kernels.paged_attention import decode_attention, varlen_attention  # noqa: E402

from ..test_packed_attention import build_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _codec(name, d, kv_heads, block_size, gen):
    codec = LayerKVCodec(page_layout(name, d, block_size, kv_heads))
    calib_k = torch.randn(32, kv_heads, d, generator=gen) * 2 + 0.3
    codec.calibrate(calib_k, torch.randn(32, kv_heads, d, generator=gen))
    return codec


def _rel_err(got, want):
    return ((got.cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,kv_heads,gqa,block_size", [(64, 2, 3, 16), (128, 1, 4, 32),
                                                       (256, 1, 1, 16), (128, 1, 8, 16),
                                                       (256, 1, 4, 16)])  # Gemma-3's heads
@pytest.mark.parametrize("swap", [False, True])  # query rows as the mma's M or N dimension
def test_decode_matches_the_codec(name, d, kv_heads, gqa, block_size, swap, gen):
    codec = _codec(name, d, kv_heads, block_size, gen)
    seq_lens = [1, 16, 37]
    cache, table, _ = build_cache(codec, seq_lens, gen, num_blocks=12)
    query = torch.randn(len(seq_lens), kv_heads * gqa, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(codec, query, cache, table, lens,
                           torch.arange(len(seq_lens) + 1), d ** -0.5)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    for splits in (1, 2, 20):  # 20: the merge reads the splits in two chunks
        got = decode_attention(codec, dev(query), dev(cache), dev(table), dev(lens), d ** -0.5,
                               num_splits=splits, swap=swap)
        assert _rel_err(got, want) <= 1e-2, splits


def _mixed_batch(name, gen, d=64, kv_heads=2, gqa=4):
    """Decode, a chunk of 5 over 12 cached tokens, a whole fresh prompt, a 3-token speculative
    step: (codec, seq_lens, q_lens, cache, table, dense K/V, qsl, query, lens)."""
    codec = _codec(name, d, kv_heads, 16, gen)
    seq_lens, q_lens = [33, 17, 40, 9], [1, 5, 40, 3]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=16)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), kv_heads * gqa, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return codec, seq_lens, q_lens, cache, table, dense, qsl, query, lens


# (256, 1, 4): Gemma-3-270M's heads, whose sliding-window layers take this path for every chunk.
HEADS = pytest.mark.parametrize("d,kv_heads,gqa", [(64, 2, 4), (256, 1, 4)])


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_2.5_mse"])
@pytest.mark.parametrize("window", [None, 20])
@HEADS
def test_mixed_batch_of_decode_and_chunks_over_cached_context(name, window, d, kv_heads, gqa, gen):
    codec, seq_lens, q_lens, cache, table, _, qsl, query, lens = _mixed_batch(name, gen, d,
                                                                             kv_heads, gqa)
    want = paged_attention(codec, query, cache, table, lens, qsl, d ** -0.5,
                           sliding_window=window)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    got = varlen_attention(codec, dev(query), dev(cache), dev(table), dev(lens), dev(qsl),
                           d ** -0.5, max(q_lens), sliding_window=window, num_splits=2)
    assert _rel_err(got, want) <= 1e-2


def _exact_part(q, k, v, scale, window):
    """Causal attention of q over its own tokens' exact k/v, and its base-2 log-sum-exp."""
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    s = torch.einsum("thgd,lhd->thgl", q.view(tq, -1, g, d), k) * scale
    pos = torch.arange(tq)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("thgl,lhd->thgd", torch.softmax(s, -1), v).reshape(tq, hq, d)
    return out, (torch.logsumexp(s, -1) * 1.4426950408889634).reshape(tq, hq)


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_3.5_mse"])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("block_q", [None, 1])
@HEADS
def test_context_only_merged_with_exact_new_tokens(name, window, block_q, d, kv_heads, gqa, gen):
    # What the backend does for multi-token steps: the step's own tokens attend to each other
    # exactly, the context before them through the pages; merged, that is attention over
    # [decoded context, exact new tokens]. Decode, a 5-token chunk, a fresh prompt, 3 speculative.
    # block_q 1: every query token its own decode row (the short-chunk path).
    from vllm_turboquant.codec import dense_attention
    from vllm_turboquant.kernels.paged_attention import merge_attention

    scale = d ** -0.5
    codec, seq_lens, q_lens, cache, table, dense, qsl, query, lens = _mixed_batch(name, gen, d,
                                                                                 kv_heads, gqa)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    out_ctx, lse_ctx = varlen_attention(codec, on(query), on(cache), on(table), on(lens), on(qsl),
                                        scale, max(q_lens), sliding_window=window, num_splits=2,
                                        context_only=True, return_lse=True, block_q=block_q)
    for i, (n, t) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        k, v = dense[i]
        k_hat, v_hat = codec.read_tokens(cache, table[i, : (n + 15) // 16], n)
        ctx = n - t
        want = dense_attention(query[rows], torch.cat([k_hat[:ctx], k[ctx:]]),
                               torch.cat([v_hat[:ctx], v[ctx:]]), scale, sliding_window=window)
        out_new, lse_new = _exact_part(query[rows], k[ctx:], v[ctx:], scale, window)
        if ctx == 0:
            assert torch.isneginf(lse_ctx[rows]).all()  # a fresh prompt has no context
        got = merge_attention(out_ctx[rows].cpu(), lse_ctx[rows].cpu(), out_new, lse_new)
        assert _rel_err(got, want) <= 1e-2, i


def test_constants_follow_calibration_in_place(gen):
    # CUDA graphs keep the buffers they captured: a later calibration must rewrite them in place,
    # the bf16 copies (rotations()) too.
    codec = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 1))
    from vllm_turboquant.kernels.paged_attention import AttentionConstants

    before = AttentionConstants.of(codec, 2, torch.device(DEVICE))
    ptr, uncalibrated = before.q_rotation.data_ptr(), before.q_rotation.clone()
    half_ptr = before.rotations(torch.bfloat16)[0].data_ptr()
    codec.calibrate(torch.randn(32, 1, 64, generator=gen) * 3, torch.randn(32, 1, 64, generator=gen))
    after = AttentionConstants.of(codec, 2, torch.device(DEVICE))
    assert after is before and after.q_rotation.data_ptr() == ptr
    rebuilt = AttentionConstants(codec, 2, torch.device(DEVICE))  # from the calibrated codec
    assert not torch.equal(rebuilt.q_rotation, uncalibrated)  # calibration moved the split
    assert torch.equal(after.q_rotation, rebuilt.q_rotation)
    for got, want in zip(after.rotations(torch.bfloat16), rebuilt.rotations(torch.bfloat16)):
        assert torch.equal(got, want)
    assert after.rotations(torch.bfloat16)[0].data_ptr() == half_ptr


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_3.5_mse"])
def test_bf16_queries_rotate_in_bf16_and_match_the_codec(name, gen):
    # vLLM's queries are bf16: both rotations run as bf16 GEMMs and the output comes back bf16.
    d, kv_heads, gqa = 128, 1, 4
    codec = _codec(name, d, kv_heads, 16, gen)
    seq_lens = [16, 37]
    cache, table, _ = build_cache(codec, seq_lens, gen, num_blocks=6)
    query = torch.randn(len(seq_lens), kv_heads * gqa, d, generator=gen).bfloat16()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(codec, query.float(), cache, table, lens,
                           torch.arange(len(seq_lens) + 1), d ** -0.5)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    got = decode_attention(codec, dev(query), dev(cache), dev(table), dev(lens), d ** -0.5,
                           num_splits=2)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), want) <= 1e-2


def test_sliding_window_never_reads_pages_before_the_window(gen):
    codec = _codec("turboquant_3.5", 64, 1, 16, gen)
    cache, table, _ = build_cache(codec, [70], gen, num_blocks=8)
    query = torch.randn(1, 2, 64, generator=gen)
    lens = torch.tensor([70], dtype=torch.int32)
    want = paged_attention(codec, query, cache, table, lens, torch.tensor([0, 1]), 0.125,
                           sliding_window=20)
    cache[table[0, :3].long()] = 0xFF  # positions 0..47: NaN norms, junk codes
    got = decode_attention(codec, query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE),
                           lens.to(DEVICE), 0.125, sliding_window=20)
    assert torch.isfinite(got).all() and _rel_err(got, want) <= 1e-2


def stage_newest(codec, cache, table, dense, seq_lens, rows, window, gen, ring_of_row=None):
    """Exact copies of each sequence's newest `window` tokens for batch rows < rows (or those
    ring_of_row gives a ring; block size 16); then row 1's newest 10 slots are rewritten by
    another request (its copies go stale)."""
    from vllm_turboquant.codec import RecentTokens

    lay = codec.layout
    recent = RecentTokens(rows=rows, window=window, num_kv_heads=lay.num_kv_heads,
                          head_dim=lay.head_dim, ring_of_row=ring_of_row)
    for row, n in enumerate(seq_lens):
        slots = table[row].long().repeat_interleave(16)[:n] * 16 + torch.arange(n) % 16
        qsl = torch.tensor([0] * (row + 1) + [n], dtype=torch.int32)
        lens = torch.tensor([0] * row + [n], dtype=torch.int32)
        recent.write(codec, cache, slots, recent.entries(slots, qsl, lens), *dense[row])
        if row == 1:
            shape = (10, lay.num_kv_heads, lay.head_dim)
            codec.write(cache, slots[-10:], torch.randn(shape, generator=gen),
                        torch.randn(shape, generator=gen))
    return recent


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_3.5_mse"])
@pytest.mark.parametrize("d,kv_heads,sliding_window", [(64, 2, None), (256, 1, 20)])
@pytest.mark.parametrize("rings", [None, [2, 0, 1, -1]])
def test_newest_tokens_read_from_their_exact_copies(name, d, kv_heads, sliding_window, rings,
                                                    gen):
    # Rows 0-2 are staged (row 1's entries then go stale: its pages are rewritten), row 3 has no
    # ring; decode, a chunk and speculative tokens; 2 splits cut through the window. Rings: batch
    # row b's ring (the engine maps each request to its own ring): by default b itself.
    from vllm_turboquant.codec import RecentTokens

    gqa, window = 4, 32
    codec = _codec(name, d, kv_heads, 16, gen)
    seq_lens, q_lens = [33, 45, 70, 9], [1, 5, 3, 1]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=16)
    ring_of_row = torch.tensor(rings, dtype=torch.int32) if rings else None
    recent = stage_newest(codec, cache, table, dense, seq_lens, 3, window, gen, ring_of_row)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), kv_heads * gqa, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(codec, query, cache, table, lens, qsl, d ** -0.5,
                           sliding_window=sliding_window, recent=recent)
    plain = paged_attention(codec, query, cache, table, lens, qsl, d ** -0.5,
                            sliding_window=sliding_window)
    assert _rel_err(plain, want) > 0.05  # the exact copies change the answer
    on = lambda t: t.to(DEVICE)  # noqa: E731
    staged = RecentTokens(rows=3, window=window, num_kv_heads=kv_heads, head_dim=d, device=DEVICE,
                          ring_of_row=on(recent.ring_of_row))
    staged.key, staged.value, staged.tag = on(recent.key), on(recent.value), on(recent.tag)
    got = varlen_attention(codec, on(query), on(cache), on(table), on(lens), on(qsl), d ** -0.5,
                           max(q_lens), sliding_window, num_splits=2, recent=staged)
    assert _rel_err(got, want) <= 1e-2


def _decode_over_rings(name, d, gen):
    """Decode (single-token tiles) over exact copies, rings permuted, row 3 without one:
    (decode_attention's arguments on DEVICE, the staged copies there, the oracle's output)."""
    from vllm_turboquant.codec import RecentTokens

    kv_heads, gqa, window = 2, 4, 32
    codec = _codec(name, d, kv_heads, 16, gen)
    seq_lens = [33, 45, 70, 9]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=16)
    recent = stage_newest(codec, cache, table, dense, seq_lens, 3, window, gen,
                          torch.tensor([2, 0, 1, -1], dtype=torch.int32))
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    query = torch.randn(len(seq_lens), kv_heads * gqa, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(codec, query, cache, table, lens, qsl, d ** -0.5, recent=recent)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    staged = RecentTokens(rows=3, window=window, num_kv_heads=kv_heads, head_dim=d, device=DEVICE,
                          ring_of_row=on(recent.ring_of_row))
    staged.key, staged.value, staged.tag = on(recent.key), on(recent.value), on(recent.tag)
    return (codec, on(query), on(cache), on(table), on(lens), d ** -0.5), staged, want


@pytest.mark.parametrize("swap", [False, True])
def test_decode_reads_exact_copies_in_both_orientations(swap, gen):
    args, staged, want = _decode_over_rings("turboquant_3.5", 64, gen)
    got = decode_attention(*args, num_splits=2, recent=staged, swap=swap)
    assert _rel_err(got, want) <= 1e-2


@pytest.mark.needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_decode_with_exact_copies_matches_eager(gen):
    args, staged, want = _decode_over_rings("turboquant_3.5_mse", 128, gen)
    eager = decode_attention(*args, recent=staged)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*args, recent=staged)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(out, want) <= 1e-2
    assert torch.equal(out, eager)
