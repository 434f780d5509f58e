"""Cache write time: one K+V launch of the Triton write (kernels/cache_write.py) per layer.

    python bench/kernel_write.py [--formats turboquant_3.5_mse,turboquant_3.5] [--tokens 48,16384]
                                 [--variants 0:32:0,2:64:8 ...] [--out F]

Llama-3.1-8B KV heads (8 × 128), block size 16; K and V are strided bf16 views of a fused QKV
projection, as vLLM hands them over; 48 tokens is a decode step of 48 sequences (with exact
copies staged), 16,384 a prompt chunk. Times are CUDA-event medians of CUDA-graph replays, hot
(inputs in L2) and after a 256 MiB L2 flush. A variant "S:BK:W" overrides the pipeline stages,
Rᵀ rows per rotation step and warps of every write (0: the shipped setting), to tune them.
"""
from __future__ import annotations

import argparse
import datetime

import torch
import triton

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout
from vllm_turboquant.kernels import cache_write

from bench_env import commit_id  # bench/ is on sys.path when run as a script
from kernel_decode import graphed

HQ, HKV, D, BS = 32, 8, 128, 16
SHIPPED = (cache_write.WRITE_STAGES, cache_write.ROTATE_BK, cache_write.CHUNK_ROTATE_BK,
           cache_write.WRITE_WARPS, cache_write.CHUNK_WRITE_WARPS)


def graph_us(fn) -> float:
    return triton.testing.do_bench(graphed(fn)) * 1e3


def use_variant(variant: str) -> None:
    """Set the write's tuning to "S:BK:W" (0 keeps the shipped value) for launchers built after
    (each codec builds its own, and every case below makes a new codec)."""
    stages, bk, warps = (int(x) for x in variant.split(":"))
    s, r, cr, w, cw = SHIPPED
    cache_write.WRITE_STAGES = stages or s
    cache_write.ROTATE_BK, cache_write.CHUNK_ROTATE_BK = (bk, bk) if bk else (r, cr)
    cache_write.WRITE_WARPS, cache_write.CHUNK_WRITE_WARPS = (warps, warps) if warps else (w, cw)


def write_case(fmt: str, n: int):
    """A zero-argument function writing n new tokens of format fmt (fresh codec and pages)."""
    codec = LayerKVCodec(page_layout(fmt, D, BS, HKV))
    codec.calibrate(torch.randn(64, HKV, D), torch.randn(64, HKV, D))
    cache = torch.zeros(n // BS + 1100, codec.layout.page_bytes, dtype=torch.uint8, device="cuda")
    recent = RecentTokens(48, 64, HKV, D, "cuda")
    qkv = torch.randn(n, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(n, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(n, HKV, D)
    slots = torch.randperm(cache.shape[0] * BS, device="cuda")[:n]
    # A decode step stages every token's exact copy (ring entry = its row); a chunk stages none.
    entries = (torch.arange(n, device="cuda", dtype=torch.int32) if n <= 48
               else torch.full((n,), -1, device="cuda", dtype=torch.int32))
    return lambda: cache_write.write_kv(codec, cache, slots, k, v, recent, entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--formats", default="turboquant_3.5_mse,turboquant_3.5")
    ap.add_argument("--tokens", default="48,16384")
    ap.add_argument("--variants", nargs="*", default=["0:0:0"])
    ap.add_argument("--out", help="also write the table to this markdown file")
    a = ap.parse_args()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush_us = graph_us(flush.zero_)
    rows = []
    for variant in a.variants:
        use_variant(variant)
        for fmt in a.formats.split(","):
            for n in (int(t) for t in a.tokens.split(",")):
                fn = write_case(fmt, n)
                hot = graph_us(fn)
                cold = graph_us(lambda: (flush.zero_(), fn())) - flush_us
                rows.append((variant, fmt, n, hot, cold))
                print(rows[-1], flush=True)
    lines = [f"`python bench/kernel_write.py` on {datetime.date.today()}, "
             f"{torch.cuda.get_device_name()}, commit {commit_id()}; shipped "
             f"stages:rows:warps = {SHIPPED[0]}:{SHIPPED[1]}:{SHIPPED[3]} (decode), "
             f"{SHIPPED[0]}:{SHIPPED[2]}:{SHIPPED[4]} (chunks).", "",
             "| variant | kv_cache_dtype | tokens | µs hot | µs after an L2 flush |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {f} | {n} | {h:.1f} | {c:.1f} |" for v, f, n, h, c in rows]
    print("\n" + "\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
