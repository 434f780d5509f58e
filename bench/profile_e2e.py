"""Profile vLLM decode steps in-process (torch.profiler): which GPU kernels and how much CPU time.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/profile_e2e.py [--layers 4] [--dtype turboquant_3.5]
                                                              [--trace out.json.gz]

Llama-3.1-8B-shaped dummy model cut to --layers layers; --prompts prompts of --prompt-len tokens
are prefilled once (prefix caching on), then --steps decode steps of the same prompts are profiled.
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
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="turboquant_3.5")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--trace", help="also write the profile as a gzipped Chrome trace here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = json.loads((CONFIGS / "llama-3.1-8b-shape.json").read_text())
    cfg["num_hidden_layers"] = args.layers
    folder = tempfile.mkdtemp()
    Path(folder, "config.json").write_text(json.dumps(cfg))
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=args.dtype,
              enforce_eager=args.eager, enable_prefix_caching=True, max_num_seqs=args.prompts,
              max_model_len=args.prompt_len + args.steps + 64, gpu_memory_utilization=0.85)
    prompts = [{"prompt_token_ids": [(i * 7919 + j * 31) % 120000 + 10 for j in range(args.prompt_len)]}
               for i in range(args.prompts)]
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False)  # noqa: E731
    llm.generate(prompts, sp(2), use_tqdm=False)        # prefill (and cache) every prompt
    llm.generate(prompts, sp(4), use_tqdm=False)        # warm the decode path
    t0 = time.time()
    llm.generate(prompts, sp(args.steps), use_tqdm=False)
    wall = time.time() - t0
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(prompts, sp(args.steps), use_tqdm=False)
    if args.trace:
        import gzip
        import shutil

        raw = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(args.trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    print(f"{args.dtype}: {args.steps} steps x {args.prompts} seqs in {wall:.2f} s "
          f"-> {wall / args.steps * 1e3:.1f} ms/step ({args.layers} layers)")


if __name__ == "__main__":
    main()
