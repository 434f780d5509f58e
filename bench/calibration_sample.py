"""How much calibration data the codec needs: attention error by calibration sample size.

    python bench/calibration_sample.py [--models smollm2,gemma3] [--format turboquant_3.5_mse]
                                       [--windows 2] [--tokens 1024] [--samples 16,64,256,1024]

Without engine-start calibration (TURBOQUANT_CALIBRATION_TOKENS=0, or no tokenizer) the plugin
fixes each layer's outlier channels and key means from the first real K/V the layer writes (the
first prefill chunk: 64 tokens in the eval's decode regime, up to max_num_batched_tokens when
serving). Here, on a real model's post-RoPE q/k/v (transformers, the
built-in text), every layer is calibrated on its first N tokens (or not at all: the default split
and no mean), all K/V go through the codec, and 64-token query chunks ending at each quarter of
the window attend over them (causal, sliding windows as the model has them, no exact copies).
The last column calibrates every layer instead on what the plugin uses when an engine starts:
the K/V of its calibration prompt (1,024 tokens of a built-in document the windows never reach,
vllm_glue/engine_calibration.py). The table gives the mean relative error of the attention output
against exact attention, over chunks, layers and windows. Pure PyTorch (the codec); runs on the
CPU.
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
CALIBRATION_TOKENS = 1024  # the plugin's default TURBOQUANT_CALIBRATION_TOKENS


def layer_error(fmt: str, q, k, v, scale, window, sample: int | tuple | None) -> float:
    """Mean relative attention error of 64-token query chunks (ending at each quarter of the
    window) with the layer calibrated on its first `sample` tokens, or on (keys, values) of
    another text (None: not calibrated)."""
    n, h, d = k.shape
    codec = LayerKVCodec(page_layout(fmt, d, BLOCK, h))
    if isinstance(sample, tuple):
        codec.calibrate(*sample)
    elif sample:
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
        calib = record_qkv(path, CALIBRATION_TOKENS, "cpu", calibration=True)[0][0]
        errs = [[layer_error(args.format, *layer, s) for w in windows for layer in w.values()]
                for s in samples]
        errs.append([layer_error(args.format, *layer, calib[i][1:3])
                     for w in windows for i, layer in w.items()])
        rows.append((f"{model} ({name})", [sum(e) / len(e) for e in errs]))
        print(name, [f"{sum(e) / len(e):.4f}" for e in errs], flush=True)
    heads = (["not calibrated"] + [f"first {s}" for s in samples[1:]]
             + [f"engine start ({CALIBRATION_TOKENS}, other text)"])
    print(f"\n`python bench/calibration_sample.py --models {args.models} --format {args.format} "
          f"--windows {args.windows} --tokens {args.tokens} --samples {args.samples}` on "
          f"{datetime.date.today()}, CPU, commit {commit_id()}: mean relative attention error vs "
          f"exact, by calibration tokens.\n")
    print("| model | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for name, errs in rows:
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")


if __name__ == "__main__":
    main()
