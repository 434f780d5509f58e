"""End-to-end decode throughput on a GPU: vLLM offline, Llama-3.1-8B-shaped dummy model.

    python bench/e2e_decode.py [--prompts 48] [--prompt-len 8192] [--gen 256]
                               [--dtypes auto,fp8,turboquant_3.5,...] [--eager]

For each kv_cache_dtype, in one process on one machine: engine start time (load, profile,
compile, CUDA-graph capture), vLLM's KV capacity, prefill time (a 1-token generation of every
prompt) and decode tokens/s, two ways:
- steady: the extra tokens of a full run over a --short run / the extra time (prefill, the mixed
  prefill+decode steps and start-up cancel out: uniform decode steps only);
- overall: generated tokens after the first / (full run - prefill run), which also charges the
  decode tokens' share of the mixed steps.
Prefix caching is off, so every run prefills again; all runs see the same prompts. An untimed
short run over every prompt comes first: a one-time slow step of the first full-batch run with
decodes (+0.8 s for turboquant_3.5_mse at 48 x 8k, bench/step_timeline.py) would otherwise land
in the timed short run and overstate the steady rate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from bench_env import commit_id, release_engine  # bench/ is on sys.path when run as a script

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--short", type=int, default=32, help="tokens of the short run (steady rate)")
    ap.add_argument("--dtypes", default="auto,fp8,turboquant_3.5,turboquant_3.5_mse")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs/compile)")
    ap.add_argument("--config", type=Path, default=CONFIGS / "llama-3.1-8b-shape.json",
                    help="HF config.json of the model shape (weights are dummy)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
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
        t0 = time.time()
        llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=dtype,
                  enforce_eager=args.eager, enable_prefix_caching=False,
                  max_model_len=args.prompt_len + args.gen + 16,
                  max_num_seqs=max(args.prompts, 8),
                  gpu_memory_utilization=args.gpu_memory_utilization)
        start = time.time() - t0
        cfg = llm.llm_engine.vllm_config.cache_config
        capacity = cfg.num_gpu_blocks * cfg.block_size
        one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
        full = SamplingParams(max_tokens=args.gen, ignore_eos=True, detokenize=False)
        short = SamplingParams(max_tokens=args.short, ignore_eos=True, detokenize=False)
        llm.generate(prompts, short, use_tqdm=False)  # one-time costs (see above), untimed
        t0 = time.time(); llm.generate(prompts, one, use_tqdm=False); prefill = time.time() - t0
        t0 = time.time(); out_s = llm.generate(prompts, short, use_tqdm=False); t_short = time.time() - t0
        t0 = time.time(); out = llm.generate(prompts, full, use_tqdm=False); total = time.time() - t0
        n = sum(len(o.outputs[0].token_ids) for o in out)
        n_s = sum(len(o.outputs[0].token_ids) for o in out_s)
        rows.append((dtype, start, capacity, prefill, (n - n_s) / max(total - t_short, 1e-9),
                     (n - len(prompts)) / max(total - prefill, 1e-9)))
        print(rows[-1], flush=True)
        release_engine(llm)
    commit = commit_id()
    base = {r[0]: r for r in rows}
    print(f"\n`python bench/e2e_decode.py` on {datetime.date.today()}, {torch.cuda.get_device_name()}, "
          f"commit {commit}: {args.prompts} prompts x {args.prompt_len} tokens + "
          f"{args.gen} generated, {'eager' if args.eager else 'CUDA graphs'}, dummy weights, "
          f"{args.config.name}.\n")
    print("| kv_cache_dtype | engine start s | KV capacity (tokens) | prefill s | decode tok/s "
          "steady | vs auto | vs fp8 | decode tok/s overall | vs auto |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for dtype, st, cap, pre, tps, overall in rows:
        rel = lambda k: f"{tps / base[k][4]:.2f}x" if k in base else "n/a"  # noqa: E731
        rel_o = f"{overall / base['auto'][5]:.2f}x" if "auto" in base else "n/a"
        print(f"| {dtype} | {st:.0f} | {cap:,} | {pre:.2f} | {tps:.0f} | {rel('auto')} | {rel('fp8')} "
              f"| {overall:.0f} | {rel_o} |")


if __name__ == "__main__":
    main()
