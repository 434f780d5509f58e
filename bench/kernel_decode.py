"""Decode attention kernel time: TurboQuant Triton kernel vs FlashAttention-3 on bf16 and fp8 pages
and vLLM's own TURBOQUANT decode kernel.

    python bench/kernel_decode.py [--contexts 1024,4096,16384,32768] [--batches 1,8,32] [--out F]

Llama-3.1-8B heads (32 query / 8 KV heads, head_dim 128), block size 16, one query token per
sequence. Times are CUDA-event medians (triton.testing.do_bench) of CUDA-graph replays, as vLLM
runs decode (without the graph, small cases measure Python launch overhead). GB/s counts the KV bytes the
kernel must read (context × KV heads × bytes per token and head); "copy" is a device-to-device
copy's bandwidth measured in the same run (bytes read + written).
"""
from __future__ import annotations

import argparse
import datetime

import torch
import triton

from vllm_turboquant.codec import FORMATS, LayerKVCodec, RecentTokens, page_layout
from vllm_turboquant.codec.recent import page_checksum
from vllm_turboquant.kernels.paged_attention import decode_attention

from bench_env import commit_id  # bench/ is on sys.path when run as a script

HQ, HKV, D, BS = 32, 8, 128, 16


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6  # GB/s


def tq_pages(fmt: str, batch: int, ctx: int, hkv: int = HKV, d: int = D):
    """(codec, pages, block table, lengths) of `batch` sequences of `ctx` random cached tokens."""
    lay = page_layout(fmt, d, BS, hkv)
    codec = LayerKVCodec(lay)
    codec.calibrate(torch.randn(64, hkv, d), torch.randn(64, hkv, d))
    blocks_per_seq = triton.cdiv(ctx, BS)
    num_blocks = batch * blocks_per_seq
    cache = torch.randint(0, 256, (num_blocks, lay.page_bytes), dtype=torch.uint8, device="cuda")
    heads = cache.view(num_blocks, hkv, lay.head_stride)
    for name, r in lay.regions.items():  # sane fp16 norms; random codes and signs are all valid
        if r.row_bytes == 2:
            heads[:, :, r.offset: r.offset + 2 * BS].view(torch.float16).fill_(0.25)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return codec, cache, table, lens


def turboquant_case(fmt: str, batch: int, ctx: int, exact: int = 0, **tuning):
    """`exact` > 0: every sequence's newest `exact` tokens also have valid exact copies, so the
    kernel takes the tag-checked path for its last tiles (the serving default)."""
    codec, cache, table, lens = tq_pages(fmt, batch, ctx)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    recent = None
    if exact:
        recent = RecentTokens(batch, exact, HKV, D, "cuda")
        pos = torch.arange(ctx - exact, ctx, device="cuda")
        slots = (table[:, pos // BS].long() * BS + pos % BS).flatten()          # [batch · exact]
        entries = (torch.arange(batch, device="cuda")[:, None] * exact + pos % exact).flatten()
        recent.tag[entries, :, 0] = slots.to(torch.int32)[:, None]
        recent.tag[entries, :, 1] = page_checksum(codec, cache, slots)
        recent.key.normal_()
        recent.value.normal_()
    fn = lambda: decode_attention(codec, q, cache, table, lens, D ** -0.5, recent=recent,  # noqa: E731
                                  **tuning)
    return fn, batch * ctx * HKV * codec.layout.slot_bytes


def upstream_case(preset: str, batch: int, ctx: int):
    """vLLM 0.26's own TURBOQUANT decode (`triton_turboquant_decode_attention`, as its backend
    calls it: 32 fixed KV splits, a random orthogonal rotation, the preset's Lloyd-Max
    centroids) over random packed slots [num_blocks, BS, HKV, slot] (timing only: random codes,
    norms and value scales are all read the same way)."""
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention

    cfg = TurboQuantConfig.from_cache_dtype(preset, D)
    blocks_per_seq = triton.cdiv(ctx, BS)
    num_blocks = batch * blocks_per_seq
    cache = torch.randint(0, 256, (num_blocks, BS, HKV, cfg.slot_size_aligned), dtype=torch.uint8,
                          device="cuda")
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    pi = torch.linalg.qr(torch.randn(D, D, device="cuda"))[0]
    centroids = get_centroids(D, cfg.centroid_bits).to(device="cuda", dtype=torch.float32)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    fn = lambda: triton_turboquant_decode_attention(  # noqa: E731
        q, cache, table, lens, pi, centroids, D ** -0.5, cfg.key_mse_bits, cfg.key_packed_size,
        cfg.effective_value_quant_bits, key_fp8=cfg.key_fp8, norm_correction=cfg.norm_correction,
        PiT=pi.T.contiguous(), max_num_kv_splits=32)
    return fn, batch * ctx * HKV * cfg.slot_size


def fa3_pages(batch: int, ctx: int, dtype: torch.dtype, hkv: int = HKV, d: int = D):
    """(k, v, block table, lengths): bf16 or fp8 pages of `batch` sequences of `ctx` tokens."""
    blocks_per_seq = triton.cdiv(ctx, BS)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, BS, hkv, d, device="cuda", dtype=torch.bfloat16).to(dtype)
    v = torch.randn(num_blocks, BS, hkv, d, device="cuda", dtype=torch.bfloat16).to(dtype)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k, v, table, lens


def fa3_case(batch: int, ctx: int, fp8: bool):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    k, v, table, lens = fa3_pages(batch, ctx, dtype)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16).to(dtype)
    cu_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    extra = {}
    if fp8:
        one = torch.ones(batch, HKV, device="cuda", dtype=torch.float32)
        extra = dict(q_descale=one, k_descale=one, v_descale=one)
    out = torch.empty(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    fn = lambda: flash_attn_varlen_func(q, k, v, max_seqlen_q=1, cu_seqlens_q=cu_q,  # noqa: E731
                                        max_seqlen_k=ctx, seqused_k=lens, softmax_scale=D ** -0.5,
                                        causal=True, block_table=table, out=out, fa_version=3,
                                        **extra)
    return fn, batch * ctx * HKV * D * 2 * (1 if fp8 else 2)


def graphed(fn):
    """fn captured in a CUDA graph (after one eager call that compiles and builds tables)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sweep(formats: list[str]) -> None:
    """BLOCK_N x num_warps x num_stages x programs x channel chunks (one or two cached tokens per
    thread: BLOCK_N = 32 · num_warps or twice that) at three loads."""
    from vllm_turboquant.kernels import paged_attention

    default_chunks = paged_attention.channel_chunks
    shapes = ((64, 1, 2), (128, 2, 2), (32, 1, 2), (128, 4, 3))
    loads = ((16, 32768), (64, 4096), (1, 32768))
    try:
        for fmt in formats:
            for chunks in (1, 2):
                # read when a codec's constants are built
                paged_attention.channel_chunks = lambda d, c=chunks: c
                for block_n, warps, stages in shapes:
                    for programs in (2112, 4224):
                        row = []
                        for batch, ctx in loads:
                            try:
                                fn, nbytes = turboquant_case(fmt, batch, ctx, block_n=block_n,
                                                             num_warps=warps, num_stages=stages,
                                                             target_programs=programs)
                                ms = triton.testing.do_bench(graphed(fn))
                                row.append(f"{batch}x{ctx} {ms * 1e3:.0f} us")
                            except Exception as e:  # noqa: BLE001
                                row.append(f"{batch}x{ctx} {type(e).__name__}")
                        print(f"{fmt} chunks={chunks} BLOCK_N={block_n} warps={warps} "
                              f"stages={stages} programs={programs}: " + ", ".join(row),
                              flush=True)
    finally:
        paged_attention.channel_chunks = default_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--formats", default="turboquant_3.5,turboquant_3.5_mse")
    ap.add_argument("--exact", type=int, default=64,
                    help="also time each format with this many exact newest tokens (0: don't)")
    ap.add_argument("--swap", choices=("default", "both"), default="default",
                    help="both: also time each format in tq_attention's SWAP orientation (query "
                         "rows as the mma's N dimension) and in the other one")
    ap.add_argument("--upstream", default="turboquant_4bit_nc",
                    help="vLLM's own TURBOQUANT presets to time too (its decode kernel; '' for none)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="time BLOCK_N x num_warps x num_stages x programs and exit")
    args = ap.parse_args()
    if args.sweep:
        return sweep(args.formats.split(","))
    commit = commit_id()
    bw = copy_bandwidth()
    lines = [f"`python bench/kernel_decode.py` on {datetime.date.today()}, "
             f"{torch.cuda.get_device_name()}, commit {commit}; copy bandwidth {bw:.0f} GB/s.", "",
             "| batch | context | kernel | µs | GB/s | % of copy | speed-up vs FA3 bf16 |",
             "|---|---|---|---|---|---|---|"]
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            cases = [("FA3 bf16", lambda: fa3_case(batch, ctx, False)),
                     ("FA3 fp8", lambda: fa3_case(batch, ctx, True))]
            for preset in filter(None, args.upstream.split(",")):
                cases.append((f"upstream {preset}", lambda p=preset: upstream_case(p, batch, ctx)))
            swaps = {"default": [True], "both": [False, True]}[args.swap]
            for f in args.formats.split(","):
                for swap in swaps:
                    tag = "" if args.swap == "default" else \
                        {False: " (rows as M)", True: " (rows as N, swap)"}[swap]
                    cases.append((f + tag, lambda f=f, sw=swap: turboquant_case(f, batch, ctx,
                                                                                swap=sw)))
                    if args.exact:
                        cases.append((f"{f}{tag} + newest {args.exact} exact",
                                      lambda f=f, sw=swap: turboquant_case(f, batch, ctx,
                                                                           args.exact, swap=sw)))
            base = None
            for name, make in cases:
                try:
                    fn, nbytes = make()
                    ms = triton.testing.do_bench(graphed(fn))
                except Exception as e:  # noqa: BLE001 - report and continue with the other kernels
                    lines.append(f"| {batch} | {ctx} | {name} | failed: {type(e).__name__}: "
                                 f"{str(e)[:80]} | | | |")
                    continue
                base = base or (ms if name == "FA3 bf16" else None)
                gbs = nbytes / ms / 1e6
                speed = f"{base / ms:.2f}x" if base else "n/a"
                lines.append(f"| {batch} | {ctx} | {name} | {ms * 1e3:.1f} | {gbs:.0f} | "
                             f"{100 * gbs / bw:.0f}% | {speed} |")
                print(lines[-1], flush=True)
                torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
