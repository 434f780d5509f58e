"""Where a vLLM run spends its time, step by step: each engine step's wall interval and batch.

    python bench/step_timeline.py [--prompts 48] [--prompt-len 8192] [--gen 256]
                                  [--dtypes auto,turboquant_3.5_mse] [--max-num-seqs N]

Same workload and engine settings as bench/e2e_decode.py (Llama-3.1-8B-shaped dummy model, prefix
caching off). The engine core runs in this process, and every step's completion time and batch
(rows with one new token vs prompt tokens) are recorded by wrapping the scheduler's
update_from_output. With async scheduling that call follows the step's GPU work, so intervals
between calls are step times. For each dtype, a prefill-only run (1 token per prompt) and a full
run, steps grouped by kind:
- prefill: prompt tokens only; mixed: prompt tokens plus decodes of prompts already done;
- decode (full): every prompt decoding; decode (ramp): fewer (prompts that started late).
"Decode cost" = full run - prefill-only run, the denominator of e2e_decode.py's overall rate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_env import commit_id, per_dtype_processes  # bench/ is on sys.path as a script

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

_steps: list[tuple[float, int, int]] = []  # (completion time, decode rows, prompt tokens)


def _record_steps() -> None:
    """Wrap Scheduler.update_from_output (the in-process engine core's) to log each step."""
    from vllm.v1.core.sched.scheduler import Scheduler

    inner = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        counts = scheduler_output.num_scheduled_tokens.values()
        ones = sum(1 for n in counts if n == 1)
        _steps.append((time.perf_counter(), ones, sum(n for n in counts if n > 1)))
        return inner(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output


def _kind(ones: int, prompt_tokens: int, batch: int) -> str:
    if prompt_tokens:
        return "mixed" if ones else "prefill"
    return "decode (full)" if ones >= batch else "decode (ramp)"


def summarize(steps: list[tuple[float, int, int]], t_start: float, batch: int) -> dict:
    """Per kind: steps, seconds, decode tokens, prompt tokens."""
    out: dict = defaultdict(lambda: [0, 0.0, 0, 0])
    prev = t_start
    for t, ones, prompt in steps:
        row = out[_kind(ones, prompt, batch)]
        row[0] += 1
        row[1] += t - prev
        row[2] += ones
        row[3] += prompt
        prev = t
    return dict(out)


def timed_run(llm, prompts, params) -> tuple[float, dict]:
    _steps.clear()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, summarize(list(_steps), t0, len(prompts))


KINDS = ("prefill", "mixed", "decode (ramp)", "decode (full)")


def measure(dtype: str, args: argparse.Namespace, folder: str) -> tuple:
    """(prefill-only run, full run) of one dtype's engine: each (wall s, summarize(...))."""
    from vllm import LLM, SamplingParams

    _record_steps()
    prompts = [{"prompt_token_ids": [(i * 7919 + j * 31) % 120000 + 10
                                     for j in range(args.prompt_len)]}
               for i in range(args.prompts)]
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False)  # noqa: E731
    llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=dtype,
              enable_prefix_caching=False, max_model_len=args.prompt_len + args.gen + 16,
              max_num_seqs=args.max_num_seqs or max(args.prompts, 8),
              gpu_memory_utilization=args.gpu_memory_utilization)
    llm.generate(prompts[:2], sp(4), use_tqdm=False)
    runs = (timed_run(llm, prompts, sp(1)), timed_run(llm, prompts, sp(args.gen)))
    print(dtype, runs, flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--dtypes", default="auto,turboquant_3.5_mse")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="0: max(prompts, 8), as e2e_decode")
    ap.add_argument("--config", type=Path, default=CONFIGS / "llama-3.1-8b-shape.json")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler must run in this process
    folder = tempfile.mkdtemp()
    Path(folder, "config.json").write_text(json.dumps(json.loads(args.config.read_text())))
    results = per_dtype_processes(args.dtypes.split(","), measure, args, folder)
    import torch

    commit = commit_id()
    print(f"\n`python bench/step_timeline.py --prompts {args.prompts} --prompt-len "
          f"{args.prompt_len} --gen {args.gen}` on {datetime.date.today()}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"commit {commit}.\n")
    print("| kv_cache_dtype | run | kind | steps | s | ms/step | decode rows/step | "
          "prompt tokens/step |\n|---|---|---|---|---|---|---|---|")
    for dtype, runs in results.items():
        for name, (wall, kinds) in zip(("prefill only", "full"), runs):
            for kind in KINDS:
                if kind not in kinds:
                    continue
                n, s, ones, prompt = kinds[kind]
                total = sum(k[0] for k in kinds.values())
                print(f"| {dtype} | {name} ({total} steps, {wall:.2f} s) | {kind} | {n} | "
                      f"{s:.2f} | {1e3 * s / n:.1f} | {ones / n:.1f} | {prompt / n:.0f} |")
    print("\n| kv_cache_dtype | decode cost s (full - prefill only) | full-batch decode tok/s |"
          "\n|---|---|---|")
    for dtype, ((w1, _), (w2, kinds)) in results.items():
        n, s, ones, _ = kinds.get("decode (full)", (0, 0.0, 0, 0))
        print(f"| {dtype} | {w2 - w1:.2f} | {ones / s if s else 0:.0f} |")


if __name__ == "__main__":
    main()
