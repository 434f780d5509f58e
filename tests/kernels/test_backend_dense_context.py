"""The backend's multi-token step with long chunks, end to end through its glue: the new tokens
attend to each other (FlashAttention, here a PyTorch stand-in), the cached context is read in
dense pieces (the Triton decoder), everything merges by log-sum-exp. Runs under Triton's
interpreter on CPU (tests/test_kernels_interpreted.py) and on a GPU."""
import math

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("vllm")

from vllm_turboquant.codec import context_kv, dense_attention  # noqa: E402
from vllm_turboquant.vllm_glue import backend  # noqa: E402

from ..test_packed_attention import build_cache  # noqa: E402
from .test_attention_kernel import DEVICE, _codec, _rel_err  # noqa: E402


def _flash_stand_in(q, k, v, cu_q, max_q, cu_k, max_k, scale, causal, window, return_lse):
    """What the backend asks of FlashAttention: varlen, causal aligned to the last key, natural
    log-sum-exp [Hq, T] (+inf for a row without keys)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), math.inf, device=q.device)
    g = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        a, b, c, e = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
        if b == a or e == c:
            continue
        s = torch.einsum("thd,lhd->thl", q[a:b].float(),
                         k[c:e].float().repeat_interleave(g, 1)) * scale
        if causal:
            ahead = torch.arange(e - c)[None, :] > torch.arange(b - a)[:, None] + (e - c) - (b - a)
            s = s.masked_fill(ahead.to(s.device)[:, None, :], -math.inf)
        p = torch.softmax(s, -1)
        out[a:b] = torch.einsum("thl,lhd->thd", p, v[c:e].float().repeat_interleave(g, 1)).to(q.dtype)
        lse[:, a:b] = torch.logsumexp(s, -1).T
    return out, lse


def test_long_chunks_read_their_context_in_pieces_like_one_attention(gen, monkeypatch):
    # Chunks of 64 and 70 new tokens over 86 and 31 cached ones, and a fresh prompt; pieces of at
    # most 40 positions: the first chunk's context spans all three pieces (merged three times).
    monkeypatch.setattr(backend, "_flash_varlen", _flash_stand_in)
    name, d, kv_heads, gqa = "turboquant_3.5_mse", 64, 2, 2
    scale = d ** -0.5
    codec = _codec(name, d, kv_heads, 16, gen)
    q_lens, seq_lens = [64, 20, 70], [150, 20, 101]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=30)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), kv_heads * gqa, d, generator=gen)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    dev = torch.device(DEVICE)
    m = backend.TurboQuantMetadata(
        num_actual_tokens=int(qsl[-1]), num_reqs=3, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), query_start_loc=qsl, seq_lens=lens,
        query_start_loc_device=on(qsl), seq_lens_device=on(lens), block_table=on(table),
        slot_mapping=on(torch.zeros(int(qsl[-1]), dtype=torch.int64)),
        context=backend._context_queries(qsl, lens, dev, on(qsl), on(lens), dense_tokens=40))
    assert [p.span.num_keys for p in m.context[-1].pieces] == [40, 40, 37]
    impl = backend.TurboQuantImpl(kv_heads * gqa, d, scale, kv_heads, kv_cache_dtype=name)
    impl.codec = codec
    new_k = torch.cat([k[n - t:] for (k, _), n, t in zip(dense, seq_lens, q_lens)])
    new_v = torch.cat([v[n - t:] for (_, v), n, t in zip(dense, seq_lens, q_lens)])
    half = lambda t: on(t).half()  # noqa: E731  (FlashAttention's dtypes)
    got = impl._new_and_cached(half(query), half(new_k), half(new_v), on(cache), m).cpu()
    for i, (n, t) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        k_hat, v_hat = context_kv(codec, cache, table[i: i + 1], lens[i: i + 1],
                                  torch.tensor([0]), torch.tensor([n - t]))
        k, v = dense[i]
        want = dense_attention(query[rows], torch.cat([k_hat, k[n - t:]]),
                               torch.cat([v_hat, v[n - t:]]), scale)
        assert _rel_err(got[rows], want) <= 1e-2, i
