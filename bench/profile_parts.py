"""Where a TurboQuant decode step spends its time on the GPU, part by part (one layer).

    python bench/profile_parts.py [--batch 48] [--context 8192] [--prefill 8192]

Times (CUDA events, triton.testing.do_bench) at Llama-3.1-8B heads: the cache write of a prefill
chunk and of one decode token per sequence, the attention kernel alone, the whole decode attention
call (query rotation, kernel, split merge, rotation back) eagerly and replayed as a CUDA graph, and
FlashAttention-3 decode on bf16 pages for reference.
"""
from __future__ import annotations

import argparse

import torch
import triton

from vllm_turboquant.codec import LayerKVCodec, page_layout
from vllm_turboquant.kernels.cache_write import write_kv
from vllm_turboquant.kernels.paged_attention import decode_attention

HQ, HKV, D, BS = 32, 8, 128, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--format", default="turboquant_3.5")
    args = ap.parse_args()
    lay = page_layout(args.format, D, BS, HKV)
    codec = LayerKVCodec(lay)
    codec.calibrate(torch.randn(64, HKV, D), torch.randn(64, HKV, D))
    blocks_per_seq = args.context // BS + 1
    num_blocks = args.batch * blocks_per_seq
    cache = torch.zeros(num_blocks, lay.page_bytes, dtype=torch.uint8, device="cuda")
    kv = lambda n: torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    rows = []

    def time(name, fn):
        fn()
        torch.cuda.synchronize()
        rows.append((name, triton.testing.do_bench(fn) * 1e3))
        print(f"{name}: {rows[-1][1]:.1f} us", flush=True)

    k, v = kv(args.prefill), kv(args.prefill)
    slots = torch.arange(args.prefill, device="cuda")
    time(f"write {args.prefill} prefill tokens", lambda: write_kv(codec, cache, slots, k, v))
    table = torch.arange(num_blocks, device="cuda", dtype=torch.int32).view(args.batch, -1)
    all_slots = (table[:, :-1].long() * BS).repeat_interleave(BS, 1) + torch.arange(BS, device="cuda").repeat(blocks_per_seq - 1)
    flat = all_slots.reshape(-1)
    for i in range(0, flat.numel(), 65536):
        s = flat[i:i + 65536]
        write_kv(codec, cache, s, kv(s.numel()), kv(s.numel()))
    k1, v1 = kv(args.batch), kv(args.batch)
    dec_slots = table[:, -2].long() * BS + BS - 1
    time(f"write {args.batch} decode tokens", lambda: write_kv(codec, cache, dec_slots, k1, v1))
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    q = torch.randn(args.batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    fn = lambda: decode_attention(codec, q, cache, table, lens, D ** -0.5)  # noqa: E731
    time("decode attention, eager", fn)
    graph = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        fn()
    time("decode attention, CUDA graph", graph.replay)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        kb = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        cu = torch.arange(args.batch + 1, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        time("FA3 bf16 decode", lambda: flash_attn_varlen_func(
            q, kb, vb, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=args.context, seqused_k=lens,
            softmax_scale=D ** -0.5, causal=True, block_table=table, out=out, fa_version=3))
    except ImportError as e:
        print("no FA3:", e)
    print("\n| part | us |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
