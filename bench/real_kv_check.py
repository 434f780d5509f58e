"""The kernels against the codec on a real model's queries, keys and values, layer by layer.

    python bench/real_kv_check.py [--model gemma3] [--format turboquant_3.5_mse] [--tokens 1024]
                                  [--chunk 64] [--layers 0,5]

The model (a built-in name or an HF folder) reads `--tokens` tokens of the built-in English text
once, in transformers; every attention layer's post-RoPE q, k, v are recorded. Per layer, all keys
and values go into TurboQuant pages (the codec's write, calibrated on the first chunk, as the
plugin does), the last chunk's tokens are staged as exact copies, and the last chunk's queries
attend the way the vLLM plugin does it:
- codec: the codec's paged attention (the CPU plugin's path and the kernels' oracle);
- kernels: what the GPU plugin does in a multi-token step: the chunk's own tokens exactly, the
  context before them through the Triton kernel (sliding-window layers and short chunks) or the
  dense dequantization (other layers, chunks of >= 64 tokens), merged by log-sum-exp.
It prints each path's relative error against exact attention over the true K/V and the kernels'
error against the codec. On a GPU the kernels run compiled; on CPU under TRITON_INTERPRET=1 (slow:
pick a few layers).
"""
from __future__ import annotations

import argparse
import math
import os
from collections import OrderedDict

import torch

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, dense_attention, page_layout
from vllm_turboquant.codec import paged_attention as codec_attention
from vllm_turboquant.quality import corpus

DENSE_MIN_QUERY = 64  # as vllm_glue.backend: longer chunks read their context densely


def record_qkv(model_path: str, tokens: int, device: str, windows: int = 1,
               calibration: bool = False) -> tuple[list[OrderedDict], str]:
    """Per window of `tokens` tokens of the built-in text (one forward pass each): {layer: (q
    [T, Hq, d], k [T, Hkv, d], v, scaling, sliding_window)}; and the model type. With
    `calibration`, one window: the plugin's engine-start calibration prompt."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: OrderedDict = OrderedDict()

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query[0].transpose(0, 1).float().cpu(),
                                  key[0].transpose(0, 1).float().cpu(),
                                  value[0].transpose(0, 1).float().cpu(),
                                  kwargs.get("scaling", module.scaling),
                                  kwargs.get("sliding_window", getattr(module, "sliding_window",
                                                                       None)))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tq_capture", capture)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="tq_capture").to(device)
    out = []
    texts = ([corpus.calibration_ids(tok, tokens)] if calibration
             else corpus.token_windows(tok, windows, tokens))
    for ids in texts:
        seen.clear()
        with torch.no_grad():
            model(torch.tensor([ids], device=device))
        out.append(OrderedDict(seen))
    return out, model.config.model_type


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal: bool, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [T, Hq, d] over k, v [L, Hkv, d] (queries: the last T positions) and its
    base-2 log-sum-exp [T, Hq], as FlashAttention gives the plugin."""
    from vllm_turboquant.kernels.paged_attention import LOG2E

    t, hq, d = q.shape
    h = k.shape[1]
    s = torch.einsum("thgd,lhd->thgl", q.float().view(t, h, hq // h, d), k.float()) * scale
    pos_q = torch.arange(k.shape[0] - t, k.shape[0], device=q.device)[:, None]
    pos_k = torch.arange(k.shape[0], device=q.device)[None, :]
    allowed = (pos_k <= pos_q) if causal else torch.ones_like(pos_k <= pos_q)
    if window is not None:
        allowed &= pos_q - pos_k < window
    s = s.masked_fill(~allowed[:, None, None, :], -math.inf)
    out = torch.einsum("thgl,lhd->thgd", torch.softmax(s, -1), v.float()).reshape(t, hq, d)
    return out, (torch.logsumexp(s, -1) * LOG2E).reshape(t, hq)


def kernel_path(codec: LayerKVCodec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pages: torch.Tensor, table: torch.Tensor, recent: RecentTokens, scale: float,
                window: int | None) -> torch.Tensor:
    """The GPU plugin's multi-token step for one sequence: q [T, Hq, d] are its newest tokens,
    k, v [T, Hkv, d] their exact keys and values, everything before them on the pages."""
    from vllm_turboquant.kernels.dense_context import context_span, dequantize_context
    from vllm_turboquant.kernels.paged_attention import merge_attention, varlen_attention

    dev, t = q.device, q.shape[0]
    total = table.shape[1] * codec.layout.block_size
    lens = torch.tensor([total], dtype=torch.int32, device=dev)
    new_out, new_lse = attend_with_lse(q, k, v, scale, True, window)
    if window is None and t >= DENSE_MIN_QUERY:  # dense context read, then plain attention
        span = context_span(torch.tensor([0]), torch.tensor([total - t]), dev)
        ck, cv = dequantize_context(codec, pages, table, lens, span, q.shape[1], torch.bfloat16,
                                    recent)
        ctx_out, ctx_lse = attend_with_lse(q, ck, cv, scale, False, None)
    else:
        qsl = torch.tensor([0, t], dtype=torch.int32, device=dev)
        ctx_out, ctx_lse = varlen_attention(codec, q, pages, table, lens, qsl, scale, t, window,
                                            recent=recent, context_only=True, return_lse=True)
    return merge_attention(ctx_out.float(), ctx_lse, new_out, new_lse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma3", help="built-in name or HF folder")
    ap.add_argument("--format", default="turboquant_3.5_mse")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    args = ap.parse_args()
    from vllm_turboquant.models import BUILTIN

    path = str(BUILTIN[args.model]()) if args.model in BUILTIN else args.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (the kernels' CPU interpreter)")
    (seen,), name = record_qkv(path, args.tokens, device)
    pick = [int(x) for x in args.layers.split(",") if x] or list(seen)
    bs, n, chunk = 16, args.tokens, args.chunk
    print(f"{name} ({path}), {args.format}, {n} tokens, last chunk of {chunk}, {device}\n")
    print("| layer | window | head_dim | Hq/Hkv | codec vs exact | kernels vs exact | "
          "kernels vs codec |\n|---|---|---|---|---|---|---|")
    for layer in pick:
        q, k, v, scale, window = seen[layer]
        h, d = k.shape[1], k.shape[2]
        codec = LayerKVCodec(page_layout(args.format, d, bs, h))
        codec.calibrate(k[:chunk], v[:chunk])
        blocks = n // bs
        pages = torch.zeros(blocks, codec.layout.page_bytes, dtype=torch.uint8)
        table = torch.arange(blocks, dtype=torch.int32).view(1, -1)
        slots = torch.arange(n)
        codec.write(pages, slots, k, v)
        recent = RecentTokens(rows=1, window=64, num_kv_heads=h, head_dim=d)
        new = slots[n - chunk:]
        entries = recent.entries(new, torch.tensor([0, chunk], dtype=torch.int32),
                                 torch.tensor([n], dtype=torch.int32))
        recent.write(codec, pages, new, entries, k[n - chunk:], v[n - chunk:])
        qc = q[n - chunk:]
        exact = dense_attention(qc, k, v, scale, sliding_window=window)
        lens = torch.tensor([n], dtype=torch.int32)
        oracle = codec_attention(codec, qc, pages, table, lens, torch.tensor([0, chunk]), scale,
                                 sliding_window=window, recent=recent)
        on = lambda t: t.to(device)  # noqa: E731
        staged = RecentTokens(rows=1, window=64, num_kv_heads=h, head_dim=d, device=device)
        staged.key, staged.value, staged.tag = on(recent.key), on(recent.value), on(recent.tag)
        got = kernel_path(codec, on(qc).to(torch.bfloat16), on(k[n - chunk:]), on(v[n - chunk:]),
                          on(pages), on(table), staged, scale, window).cpu()
        err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        print(f"| {layer} | {window or '-'} | {d} | {q.shape[1]}/{h} | {err(oracle, exact):.4f} | "
              f"{err(got, exact):.4f} | {err(got, oracle):.4f} |", flush=True)


if __name__ == "__main__":
    main()
