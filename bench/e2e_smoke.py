"""End-to-end smoke run on a GPU: vLLM offline, Llama-3.1-8B-shaped dummy model, our dtypes vs auto.

    python bench/e2e_smoke.py [--prompts 16] [--prompt-len 2048] [--gen 128] [--dtypes ...]

Prints, per kv_cache_dtype, vLLM's KV capacity and decode throughput (generated tokens / s of the
generation phase, measured as total time minus a 1-token run's time). enforce_eager: the TurboQuant
backend does not support CUDA graphs yet, so auto/fp8 also run eager here for a like-for-like number.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--dtypes", default="auto,turboquant_3.5,turboquant_3.5_mse")
    ap.add_argument("--config", type=Path, default=CONFIGS / "llama-3.1-8b-shape.json",
                    help="HF config.json of the model shape (weights are dummy)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(json.loads(args.config.read_text()), f)
    import torch
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [(i * 7919 + j * 31) % 120000 + 10 for j in range(args.prompt_len)]}
               for i in range(args.prompts)]
    rows = []
    for dtype in args.dtypes.split(","):
        llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=dtype,
                  enforce_eager=True, enable_prefix_caching=False, max_model_len=args.prompt_len + args.gen + 16,
                  gpu_memory_utilization=0.85)
        cfg = llm.llm_engine.vllm_config.cache_config
        capacity = cfg.num_gpu_blocks * cfg.block_size
        one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
        full = SamplingParams(max_tokens=args.gen, ignore_eos=True, detokenize=False)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))  # JIT
        t0 = time.time(); llm.generate(prompts, one); prefill = time.time() - t0
        t0 = time.time(); out = llm.generate(prompts, full); total = time.time() - t0
        n = sum(len(o.outputs[0].token_ids) for o in out)
        rows.append((dtype, capacity, prefill, (n - len(prompts)) / max(total - prefill, 1e-9)))
        print(rows[-1], flush=True)
        del llm
        torch.cuda.empty_cache()
    print(f"\n{args.prompts} prompts x {args.prompt_len} tokens + {args.gen} generated, eager, "
          f"{torch.cuda.get_device_name()}")
    print("| kv_cache_dtype | KV capacity (tokens) | prefill s | decode tok/s |\n|---|---|---|---|")
    for dtype, cap, pre, tps in rows:
        print(f"| {dtype} | {cap:,} | {pre:.2f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
