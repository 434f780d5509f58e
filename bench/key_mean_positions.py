"""Does a key mean learned at positions 0..1,023 still help at long positions?

    python bench/key_mean_positions.py [--model gemma3] [--tokens 8192]
                                       [--format turboquant_3.5_mse]
    python bench/key_mean_positions.py --sinks [--model smollm2]

Keys are post-RoPE, so a per-head mean measured on the engine-start prompt (positions 0-1,023)
rotates away from the keys of later positions in every RoPE pair that turns noticeably over the
context. Here each layer is calibrated on that prompt with the key mean removed as the plugin
does by default (in the heads where that shortens the sink's key), or in none, all K/V of one
long window of the built-in text go through the codec, and 64-token query
chunks ending at 1k, 2k, 4k, ... attend over them (causal, the model's sliding windows, no exact
copies). Printed: mean relative attention error vs exact, split into sliding-window and global
layers. Pure PyTorch (the codec); runs on the CPU.

`--sinks` prints instead, per layer of the engine-start prompt, how the first token's key (the
attention sink) sits against the key mean: cos(k0, μ) and |k0 - μ| / |k0| per KV head. The
plugin removes μ only in heads where the latter is ≤ 1 (`LayerKVCodec._centre_keys`).
"""
from __future__ import annotations

import argparse
import datetime

import torch

from bench_env import commit_id  # bench/ is on sys.path when run as a script
from real_kv_check import record_qkv
from vllm_turboquant.codec import LayerKVCodec, dense_attention, page_layout
from vllm_turboquant.codec import paged_attention as codec_attention
from vllm_turboquant.models import BUILTIN

BLOCK, CHUNK, CALIBRATION_TOKENS = 16, 64, 1024


def errors(fmt: str, window_qkv, calib, centre: bool, ends: list[int]) -> dict:
    rows: dict[tuple[str, int], list[float]] = {}
    for i, (q, k, v, scale, window) in window_qkv.items():
        n, h, d = k.shape
        codec = LayerKVCodec(page_layout(fmt, d, BLOCK, h), center_keys=centre)
        codec.calibrate(calib[i][1], calib[i][2])
        pages = torch.zeros(n // BLOCK, codec.layout.page_bytes, dtype=torch.uint8)
        codec.write(pages, torch.arange(n), k, v)
        table = torch.arange(n // BLOCK, dtype=torch.int32).view(1, -1)
        kind = "global" if window is None else "sliding"
        for end in ends:
            qc = q[end - CHUNK:end]
            exact = dense_attention(qc, k[:end], v[:end], scale, sliding_window=window)
            got = codec_attention(codec, qc, pages, table, torch.tensor([end], dtype=torch.int32),
                                  torch.tensor([0, CHUNK]), scale, sliding_window=window)
            rows.setdefault((kind, end), []).append(((got - exact).norm() / exact.norm()).item())
    return {key: sum(v) / len(v) for key, v in rows.items()}


def sinks(calib) -> None:
    print("| layer | cos(k0, mean) per head | abs(k0 - mean) / abs(k0) per head | centred heads |")
    print("|---|---|---|---|")
    for i, (_, k, _, _, _) in calib.items():
        mean, k0 = k.mean(0), k[0]
        cos = torch.nn.functional.cosine_similarity(k0, mean, dim=-1)
        rel = (k0 - mean).norm(dim=-1) / k0.norm(dim=-1)
        print(f"| {i} | " + " ".join(f"{c:.2f}" for c in cos.tolist()) + " | "
              + " ".join(f"{r:.2f}" for r in rel.tolist()) + f" | {int((rel <= 1).sum())} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--format", default="turboquant_3.5_mse")
    ap.add_argument("--sinks", action="store_true")
    args = ap.parse_args()
    path = str(BUILTIN[args.model]()) if args.model in BUILTIN else args.model
    if args.sinks:
        print(f"`python bench/key_mean_positions.py --sinks --model {args.model}` on "
              f"{datetime.date.today()}, CPU, commit {commit_id()}:\n")
        sinks(record_qkv(path, CALIBRATION_TOKENS, "cpu", calibration=True)[0][0])
        return
    window_qkv = record_qkv(path, args.tokens, "cpu", 1)[0][0]
    calib = record_qkv(path, CALIBRATION_TOKENS, "cpu", calibration=True)[0][0]
    ends = [e for e in (1024, 2048, 4096, 8192, 16384, 32768) if e <= args.tokens]
    table = {c: errors(args.format, window_qkv, calib, c, ends) for c in (True, False)}
    kinds = sorted({kind for kind, _ in table[True]})
    print(f"\n`python bench/key_mean_positions.py --model {args.model} --tokens {args.tokens} "
          f"--format {args.format}` on {datetime.date.today()}, CPU, commit {commit_id()}: mean "
          f"relative attention error vs exact of the 64-token chunk ending at each position.\n")
    print("| layers | key mean removed in | " + " | ".join(f"at {e}" for e in ends) + " |")
    print("|---|---|" + "---|" * len(ends))
    for kind in kinds:
        for c in (True, False):
            print(f"| {kind} | {'default heads' if c else 'no head'} | "
                  + " | ".join(f"{table[c][(kind, e)]:.4f}" for e in ends) + " |")


if __name__ == "__main__":
    main()
