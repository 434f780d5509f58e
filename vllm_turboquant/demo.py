"""The README's main job: generate with TurboQuant through vLLM and show the KV capacity gain.

    python -m vllm_turboquant.demo                       # built-in SmolLM2-135M on this machine
    python -m vllm_turboquant.demo --model MODEL         # any vLLM model (GPU machines)
"""
from __future__ import annotations

import argparse
import os
import time

PROMPTS = ["The capital of France is", "Write one sentence about the sea:",
           "Three primary colors are"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF folder or model id (default: the built-in SmolLM2-135M)")
    ap.add_argument("--kv-cache-dtype", default="turboquant_3.5")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args(argv)

    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:  # quick, stable CPU settings (see README)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    model = args.model
    if model is None:
        from .models import smollm2_path
        model = str(smollm2_path())

    from vllm import LLM, SamplingParams

    from .codec import FORMATS

    t0 = time.time()
    llm = LLM(model=model, kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              enforce_eager=on_cpu)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    for o in outputs:
        print(f"\n>>> {o.prompt}\n{o.outputs[0].text.strip()}")

    cfg = llm.llm_engine.vllm_config
    tokens = cfg.cache_config.num_gpu_blocks * cfg.cache_config.block_size
    head = cfg.model_config.get_head_size()
    gain = FORMATS[args.kv_cache_dtype].compression_vs_bf16(head)
    print(f"\nkv_cache_dtype={args.kv_cache_dtype}: {FORMATS[args.kv_cache_dtype].bytes_per_token_head(head)} "
          f"bytes per token and KV head (bf16: {4 * head}), head_dim {head}")
    print(f"KV cache capacity: {tokens:,} tokens; bf16 would fit {int(tokens / gain):,} in the same "
          f"memory ({gain:.2f}x more tokens). Ran in {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
