"""How much calibration data the codec needs: attention error by calibration sample size.

    python bench/calibration_sample.py [--models smollm2,gemma3] [--format turboquant_3.5_mse]
                                       [--windows 2] [--tokens 1024] [--samples 16,64,256,1024]

The plugin fixes each layer's outlier channels and key means from the first real K/V the layer
writes (the first prefill chunk: 64 tokens in the eval's decode regime, up to
max_num_batched_tokens when serving). Here, on a real model's post-RoPE q/k/v (transformers, the
built-in text), every layer is calibrated on its first N tokens (or not at all: the default split
and no mean), all K/V go through the codec, and 64-token query chunks ending at each quarter of
the window attend over them (causal, sliding windows as the model has them, no exact copies).
The table gives the mean relative error of the attention output against exact attention, over
chunks, layers and windows. Pure PyTorch (the codec); runs on the CPU.
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

BLOCK, CHUNK = 16, 64


def layer_error(fmt: str, q, k, v, scale, window, sample: int | None) -> float:
    """Mean relative attention error of 64-token query chunks (ending at each quarter of the
    window) with the layer calibrated on its first `sample` tokens (None: not calibrated)."""
    n, h, d = k.shape
    codec = LayerKVCodec(page_layout(fmt, d, BLOCK, h))
    if sample:
        codec.calibrate(k[:sample], v[:sample])
    pages = torch.zeros(n // BLOCK, codec.layout.page_bytes, dtype=torch.uint8)
    table = torch.arange(n // BLOCK, dtype=torch.int32).view(1, -1)
    codec.write(pages, torch.arange(n), k, v)
    errors = []
    for end in (n // 4, n // 2, 3 * n // 4, n):
        qc = q[end - CHUNK:end]
        exact = dense_attention(qc, k[:end], v[:end], scale, sliding_window=window)
        got = codec_attention(codec, qc, pages, table, torch.tensor([end], dtype=torch.int32),
                              torch.tensor([0, CHUNK]), scale, sliding_window=window)
        errors.append(((got - exact).norm() / exact.norm()).item())
    return sum(errors) / len(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--format", default="turboquant_3.5_mse")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", default="16,64,256,1024")
    args = ap.parse_args()
    samples = [None] + [int(s) for s in args.samples.split(",")]
    rows = []
    for model in args.models.split(","):
        path = str(BUILTIN[model]()) if model in BUILTIN else model
        windows, name = record_qkv(path, args.tokens, "cpu", args.windows)
        errs = [[layer_error(args.format, *layer, s) for w in windows for layer in w.values()]
                for s in samples]
        rows.append((f"{model} ({name})", [sum(e) / len(e) for e in errs]))
        print(name, [f"{sum(e) / len(e):.4f}" for e in errs], flush=True)
    heads = ["not calibrated"] + [f"first {s}" for s in samples[1:]]
    print(f"\n`python bench/calibration_sample.py --models {args.models} --format {args.format} "
          f"--windows {args.windows} --tokens {args.tokens} --samples {args.samples}` on "
          f"{datetime.date.today()}, CPU, commit {commit_id()}: mean relative attention error vs "
          f"exact, by calibration tokens.\n")
    print("| model | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for name, errs in rows:
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")


if __name__ == "__main__":
    main()
