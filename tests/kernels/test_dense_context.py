"""The Triton context decoder (dense K/V for FlashAttention) against the codec's context_kv.

On CPU these run under Triton's interpreter (tests/test_kernels_interpreted.py)."""
import pytest
import torch

pytest.importorskip("triton")

from vllm_turboquant.codec import FORMATS, RecentTokens, context_kv  # noqa: E402
from vllm_turboquant.kernels import dense_context  # noqa: E402
from vllm_turboquant.kernels.dense_context import (context_span,  # noqa: E402
                                                   dequantize_context)

from ..test_packed_attention import build_cache  # noqa: E402
from .test_attention_kernel import DEVICE, _codec, _rel_err, stage_newest  # noqa: E402

on = lambda t: t.to(DEVICE)  # noqa: E731


def _decode(codec, cache, table, lens, starts, ends, limit=None, recent=None):
    span = context_span(starts, ends, torch.device(DEVICE), None if limit is None else on(limit))
    k, v = dequantize_context(codec, on(cache), on(table), on(lens), span, num_q_heads=4,
                              dtype=torch.bfloat16, recent=recent)
    return k[: int(span.cu_keys[-1])].float().cpu(), v[: int(span.cu_keys[-1])].float().cpu()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,kv_heads,block_size", [(64, 2, 16), (128, 1, 32), (256, 1, 16)])
def test_dense_context_matches_the_codec(name, d, kv_heads, block_size, gen):
    # Whole contexts, a range starting mid-page, an empty row, one past a tile boundary.
    codec = _codec(name, d, kv_heads, block_size, gen)
    seq_lens = [37, 90, 12, 70]
    cache, table, _ = build_cache(codec, seq_lens, gen, num_blocks=20)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    starts = torch.tensor([0, 21, 5, 0])
    ends = torch.tensor([30, 90, 5, 65])
    want_k, want_v = context_kv(codec, cache, table, lens, starts, ends)
    got_k, got_v = _decode(codec, cache, table, lens, starts, ends)
    assert got_k.shape == want_k.shape == (30 + 69 + 65, kv_heads, d)
    assert _rel_err(got_k, want_k) <= 1e-2 and _rel_err(got_v, want_v) <= 1e-2


def test_device_limit_clips_host_upper_bounds(gen):
    codec = _codec("turboquant_3.5_mse", 64, 1, 16, gen)
    cache, table, _ = build_cache(codec, [40, 50], gen, num_blocks=8)
    lens = torch.tensor([40, 50], dtype=torch.int32)
    starts, ends = torch.tensor([0, 0]), torch.tensor([40, 50])
    limit = torch.tensor([33, 50], dtype=torch.int32)  # row 0 really has 33 cached positions
    want_k, _ = context_kv(codec, cache, table, lens, starts, torch.tensor([33, 50]))
    got_k, _ = _decode(codec, cache, table, lens, starts, ends, limit=limit)
    assert got_k.shape[0] == 83 and _rel_err(got_k, want_k) <= 1e-2


@pytest.mark.parametrize("name", ["turboquant_3.5", "turboquant_3.5_mse"])
@pytest.mark.parametrize("d,kv_heads,blocks", [(64, 2, "full"), (256, 1, "full"),
                                               (256, 1, "split")])
@pytest.mark.parametrize("rings", [None, [1, 0, -1]])
def test_exact_copies_replace_their_decoded_tokens(name, d, kv_heads, blocks, rings, gen,
                                                   monkeypatch):
    # blocks: the back-rotation as one matrix per dot, or in two column blocks as on GPUs with
    # 99 KB of shared memory per program (head_dim 256 only).
    if blocks == "split":
        monkeypatch.setattr(dense_context, "shared_memory_limit", lambda device: 99 << 10)
        assert dense_context.out_split(d, torch.device(DEVICE)) == 2
    # Row 0 staged and current, row 1's newest slots rewritten by another request (stale copies),
    # row 2 without a ring (rings: each batch row's ring; by default the row itself).
    window = 32
    codec = _codec(name, d, kv_heads, 16, gen)
    seq_lens = [45, 60, 50]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=16)
    ring_of_row = torch.tensor(rings, dtype=torch.int32) if rings else None
    recent = stage_newest(codec, cache, table, dense, seq_lens, 2, window, gen, ring_of_row)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    starts, ends = torch.tensor([0, 0, 0]), torch.tensor(seq_lens)
    want_k, want_v = context_kv(codec, cache, table, lens, starts, ends, recent=recent)
    plain_k, _ = context_kv(codec, cache, table, lens, starts, ends)
    assert _rel_err(plain_k, want_k) > 0.02  # the copies change the answer
    assert torch.allclose(want_k[20:45], dense[0][0][20:45], atol=1e-2)  # row 0's newest, exact
    staged = RecentTokens(rows=2, window=window, num_kv_heads=kv_heads, head_dim=d, device=DEVICE,
                          ring_of_row=on(recent.ring_of_row))
    staged.key, staged.value, staged.tag = on(recent.key), on(recent.value), on(recent.tag)
    got_k, got_v = _decode(codec, cache, table, lens, starts, ends, recent=staged)
    assert _rel_err(got_k, want_k) <= 1e-2 and _rel_err(got_v, want_v) <= 1e-2

