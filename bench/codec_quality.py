"""Codec quality: every TurboQuant format vs FP8 and an upstream-vLLM-like 4-bit scheme.

    python bench/codec_quality.py [--windows 6] [--out docs/codec_quality.md]

Prints three markdown tables (and writes them to --out):
  (a) random Gaussian K/V/Q at head_dim 128;
  (b) real post-RoPE K/V/Q captured from SmolLM2-135M (head_dim 64, 30 layers) on the built-in
      text, each scheme calibrated on the first 64 tokens as the vLLM backend is;
  (c) end to end, teacher-forced: SmolLM2 in transformers with every cached K/V passed through the
      scheme (queries exact): perplexity, mean KL(bf16 ‖ scheme) over the full vocabulary, top-1.
Metrics in (a)/(b): normalised MSE ‖x − x̂‖²/‖x‖² of K and V; inner-product error
rms(q·k̂ − q·k)/rms(q·k); attention-output relative error ‖o − ô‖/‖o‖; mean softmax KL(p ‖ p̂).
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

from vllm_turboquant.quality import corpus, hf_sim, metrics, schemes

from bench_env import commit_id  # bench/ is on sys.path when run as a script


def kv_metrics(scheme, q, k, v, causal: bool, n_queries: int = 256) -> dict[str, float]:
    """q [L, Hq, d], k/v [L, H, d]; attention for the last n_queries positions."""
    length, h, d = k.shape
    quant = scheme.layer(d, h)
    quant.calibrate(k[:64], v[:64])
    k_hat, v_hat = quant.roundtrip(k, v)
    g = q.shape[1] // h
    qq = q[-n_queries:].view(-1, h, g, d)
    s = torch.einsum("thgd,lhd->hgtl", qq, k) / math.sqrt(d)
    s_hat = torch.einsum("thgd,lhd->hgtl", qq, k_hat) / math.sqrt(d)
    if causal:
        pos_q = torch.arange(length - qq.shape[0], length).view(-1, 1)
        mask = torch.arange(length).view(1, -1) > pos_q
        s, s_hat = s.masked_fill(mask, -math.inf), s_hat.masked_fill(mask, -math.inf)
    p, logp_hat = torch.softmax(s, -1), torch.log_softmax(s_hat, -1)
    o = torch.einsum("hgtl,lhd->thgd", p, v)
    o_hat = torch.einsum("hgtl,lhd->thgd", logp_hat.exp(), v_hat)
    live = torch.isfinite(s)
    ip = (s_hat - s)[live].pow(2).mean().sqrt() / s[live].pow(2).mean().sqrt()
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logp_hat), 0).sum(-1).mean()
    return {"k_nmse": ((k - k_hat).pow(2).sum() / k.pow(2).sum()).item(),
            "v_nmse": ((v - v_hat).pow(2).sum() / v.pow(2).sum()).item(),
            "ip_err": ip.item(), "attn_err": ((o - o_hat).norm() / o.norm()).item(),
            "softmax_kl": kl.item()}


def table_kv(rows: list[tuple], head_dim: int) -> str:
    out = ["| scheme | B/token/head | vs bf16 | K nMSE | V nMSE | ⟨q,k⟩ err | attn-out err | softmax KL |",
           "|---|---|---|---|---|---|---|---|"]
    for scheme, m in rows:
        b = scheme.bytes_per_token_head(head_dim)
        out.append(f"| {scheme.name} | {b} | {4 * head_dim / b:.2f}x | {m['k_nmse']:.4f} | "
                   f"{m['v_nmse']:.4f} | {m['ip_err']:.4f} | {m['attn_err']:.4f} | "
                   f"{m['softmax_kl']:.5f} |")
    return "\n".join(out)


def random_vectors(all_schemes) -> str:
    g = torch.Generator().manual_seed(0)
    d, h, length = 128, 2, 2048
    k = torch.randn(length, h, d, generator=g)
    v = torch.randn(length, h, d, generator=g)
    q = torch.randn(length, 4 * h, d, generator=g) * 2  # some attention sharpness
    return table_kv([(s, kv_metrics(s, q, k, v, causal=False)) for s in all_schemes], d)


def real_kv(model, tok, all_schemes) -> str:
    window = corpus.token_windows(tok, 1, 1024, offset_docs=7)[0]
    layers = hf_sim.capture_qkv(model, window)
    rows = []
    for s in all_schemes:
        per_layer = [kv_metrics(s, q, k, v, causal=True) for q, k, v in layers.values()]
        rows.append((s, {key: sum(m[key] for m in per_layer) / len(per_layer) for key in per_layer[0]}))
    head_dim = next(iter(layers.values()))[1].shape[-1]
    return table_kv(rows, head_dim)


def end_to_end(model, tok, all_schemes, windows: int, length: int) -> str:
    texts = corpus.token_windows(tok, windows, length)
    refs = [hf_sim.Simulation(model, None).logits(ids) for ids in texts]
    base = metrics.Agreement()
    for ids, ref in zip(texts, refs):
        base.add(ref[:-1], ref[:-1], torch.tensor(ids[1:]))
    out = [f"bf16 reference perplexity {base.ppl:.3f} over {base.count} predicted tokens "
           f"({windows} windows of {length}).", "",
           "| scheme | B/token/head | PPL | ΔPPL | mean KL | top-1 agreement |", "|---|---|---|---|---|---|"]
    for s in all_schemes:
        sim, agg = hf_sim.Simulation(model, s), metrics.Agreement()
        for ids, ref in zip(texts, refs):
            agg.add(ref[:-1], sim.logits(ids)[:-1], torch.tensor(ids[1:]))
        out.append(f"| {s.name} | {s.bytes_per_token_head(64)} | {agg.ppl:.3f} | "
                   f"{100 * (agg.ppl / base.ppl - 1):+.1f}% | {agg.mean_kl:.4f} | "
                   f"{agg.top1_agreement:.3f} |")
        print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=6, help="end-to-end windows of --length tokens")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from vllm_turboquant.models import smollm2_path

    t0 = time.time()
    all_schemes = schemes.benchmark_schemes()
    commit = commit_id()
    model, tok = hf_sim.load_model(str(smollm2_path()))
    parts = [f"Made by `python bench/codec_quality.py --windows {args.windows}` on "
             f"{datetime.date.today()} (CPU, commit {commit}).",
             "", "### (a) Random Gaussian vectors, head_dim 128", "", random_vectors(all_schemes),
             "", "### (b) Real post-RoPE K/V from SmolLM2-135M (head_dim 64), mean over 30 layers",
             "", real_kv(model, tok, all_schemes),
             "", "### (c) End to end: SmolLM2-135M, every cached K/V through the scheme "
             "(teacher-forced)", "", end_to_end(model, tok, all_schemes, args.windows, args.length)]
    text = "\n".join(parts) + f"\n\n({time.time() - t0:.0f} s)\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
