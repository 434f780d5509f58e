"""Short query chunks over cached context: TurboQuant Triton kernel vs FlashAttention-3 on bf16 pages.

    python bench/kernel_chunk.py [--batch 48] [--context 8192] [--chunks 2,4,16]
                                 [--heads 32,8,128] [--sweep]

The attention a multi-token step does over the context cached before it, when each sequence
brings fewer than DENSE_MIN_QUERY new tokens: speculative tokens, a prefix-cache hit that
recomputes its last partial block, small prefill chunks, and every chunk of a sliding-window
layer. Called as the backend calls it (context_only, with the log-sum-exp). Heads (query, KV,
head_dim) default to Llama-3.1-8B's (Gemma-3-270M: 4,1,256); block size 16, CUDA-graph replays.
FA3 runs the same queries causally over the bf16 pages (context plus the chunk itself).
--sweep: tokens per query tile x BLOCK_N x num_warps x programs for each chunk length.
"""
from __future__ import annotations

import argparse
import datetime

import torch
import triton

from vllm_turboquant.kernels.paged_attention import varlen_attention

from bench_env import commit_id  # bench/ is on sys.path when run as a script
from kernel_decode import fa3_pages, graphed, tq_pages

HEADS = (32, 8, 128)


def tq_chunk_case(fmt: str, batch: int, ctx: int, chunk: int, **tuning):
    hq, hkv, d = HEADS
    codec, cache, table, lens = tq_pages(fmt, batch, ctx + chunk, hkv, d)
    q = torch.randn(batch * chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(0, batch * chunk + 1, chunk, device="cuda", dtype=torch.int32)
    return lambda: varlen_attention(  # noqa: E731
        codec, q, cache, table, lens, qsl, d ** -0.5, chunk, context_only=True, return_lse=True,
        **tuning)


def fa3_chunk_case(batch: int, ctx: int, chunk: int):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    hq, hkv, d = HEADS
    k, v, table, lens = fa3_pages(batch, ctx + chunk, torch.bfloat16, hkv, d)
    q = torch.randn(batch * chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.arange(0, batch * chunk + 1, chunk, device="cuda", dtype=torch.int32)
    return lambda: flash_attn_varlen_func(  # noqa: E731
        q, k, v, max_seqlen_q=chunk, cu_seqlens_q=cu_q, max_seqlen_k=ctx + chunk, seqused_k=lens,
        softmax_scale=d ** -0.5, causal=True, block_table=table, fa_version=3,
        return_softmax_lse=True)


def time_us(fn) -> float:
    return triton.testing.do_bench(graphed(fn)) * 1e3


def sweep(fmt: str, batch: int, ctx: int, chunks: list[int]) -> None:
    for chunk in chunks:
        print(f"{fmt} {batch} x {chunk} tokens over {ctx}: FA3 bf16 "
              f"{time_us(fa3_chunk_case(batch, ctx, chunk)):.0f} us", flush=True)
        for block_q in sorted({1, 4, 16, chunk} - {0}):
            for block_n, warps in ((64, 1), (64, 4), (128, 4), (128, 8)):
                for programs in (1056, 4224):
                    try:
                        us = time_us(tq_chunk_case(fmt, batch, ctx, chunk, block_q=block_q,
                                                   block_n=block_n, num_warps=warps,
                                                   target_programs=programs))
                        res = f"{us:.0f} us"
                    except Exception as e:  # noqa: BLE001 - report and go on
                        res = f"{type(e).__name__}: {str(e)[:60]}"
                    print(f"  block_q={block_q} BLOCK_N={block_n} warps={warps} "
                          f"programs={programs}: {res}", flush=True)
                    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunks", default="2,4,16")
    ap.add_argument("--formats", default="turboquant_3.5_mse,turboquant_3.5")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head_dim")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    global HEADS
    HEADS = tuple(int(x) for x in args.heads.split(","))
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.sweep:
        return sweep(args.formats.split(",")[0], args.batch, args.context, chunks)
    lines = [f"`python bench/kernel_chunk.py --batch {args.batch} --context {args.context} "
             f"--heads {args.heads}` on "
             f"{datetime.date.today()}, {torch.cuda.get_device_name()}, commit {commit_id()}.", "",
             "| new tokens per sequence | kernel | µs | vs FA3 bf16 |", "|---|---|---|---|"]
    for chunk in chunks:
        base = time_us(fa3_chunk_case(args.batch, args.context, chunk))
        lines.append(f"| {chunk} | FA3 bf16 | {base:.1f} | 1.00x |")
        for fmt in args.formats.split(","):
            us = time_us(tq_chunk_case(fmt, args.batch, args.context, chunk))
            lines.append(f"| {chunk} | {fmt} | {us:.1f} | {base / us:.2f}x |")
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
