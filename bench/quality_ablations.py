"""Candidate quality improvements for issue 4, measured with the codec-only simulation.

    python bench/quality_ablations.py [--windows 3]

SmolLM2-135M (head_dim 64) in transformers, teacher-forced, every cached K/V through the scheme
(see bench/codec_quality.py). Two tables:
  (1) moving bits between keys and values at equal bytes (MSE-only keys and values);
  (2) keeping each sequence's newest, not-yet-full block exact (bf16), for block sizes 16 and 64.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vllm_turboquant.codec import LayerKVCodec, PageLayout
from vllm_turboquant.codec import formats as F
from vllm_turboquant.models import smollm2_path
from vllm_turboquant.quality import corpus, hf_sim, metrics, schemes


@dataclass(frozen=True)
class BitSplit(schemes.Scheme):
    """MSE-only keys with (outlier, regular) bits `k`, values with `v`."""

    k: tuple[int, int] = (4, 3)
    v: tuple[int, int] = (4, 3)

    def _format(self) -> F.KVFormat:
        return F.KVFormat(self.name, F.TensorFormat("mse", *self.k), F.TensorFormat("mse", *self.v), "")

    def bytes_per_token_head(self, head_dim):
        return self._format().bytes_per_token_head(head_dim)

    def layer(self, head_dim, num_kv_heads):
        return schemes._TurboQuant(LayerKVCodec(PageLayout(self._format(), head_dim, 16, num_kv_heads)))


def measure(model, texts, refs, scheme, **sim_kwargs) -> metrics.Agreement:
    sim, agg, base = hf_sim.Simulation(model, scheme, **sim_kwargs), metrics.Agreement(), metrics.Agreement()
    for ids, ref in zip(texts, refs):
        target = torch.tensor(ids[1:])
        agg.add(ref[:-1], sim.logits(ids)[:-1], target)
        base.add(ref[:-1], ref[:-1], target)
    agg.base_ppl = base.ppl
    return agg


def row(name: str, nbytes: int, a: metrics.Agreement) -> str:
    return (f"| {name} | {nbytes} | {100 * (a.ppl / a.base_ppl - 1):+.1f}% | {a.mean_kl:.4f} | "
            f"{a.top1_agreement:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = hf_sim.load_model(str(smollm2_path()))
    texts = corpus.token_windows(tok, args.windows, 1024)
    refs = [hf_sim.Simulation(model, None).logits(ids) for ids in texts]
    head = "| scheme | B/token/head (d=64) | ΔPPL | mean KL | top-1 |\n|---|---|---|---|---|"
    print(f"(1) Bits between keys and values, MSE-only, {args.windows} x 1024 tokens\n\n{head}")
    for k, v in [((4, 3), (4, 3)), ((5, 4), (3, 2)), ((4, 4), (4, 2)), ((4, 3), (2, 2))]:
        s = BitSplit(f"K {k[0]}/{k[1]} b, V {v[0]}/{v[1]} b", k, v)
        print(row(s.name, s.bytes_per_token_head(64), measure(model, texts, refs, s)), flush=True)
    print(f"\n(2) Newest, not-yet-full block kept exact\n\n{head}")
    for fmt in ("turboquant_3.5_mse", "turboquant_3.5", "turboquant_2.5_mse"):
        s = schemes.TurboQuant(fmt, fmt)
        for block in (0, 16, 64):
            a = measure(model, texts, refs, s, exact_recent_block=block)
            label = f"{fmt}, " + (f"newest {block} exact" if block else "all quantized")
            print(row(label, s.bytes_per_token_head(64), a), flush=True)


if __name__ == "__main__":
    main()
