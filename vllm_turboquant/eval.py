"""Quality of every kv_cache_dtype through vLLM, against the bf16 cache: one command, one table.

    python -m vllm_turboquant.eval [--config configs/eval-smollm2.json] [--model PATH_OR_NAME]
                                   [--dtypes auto,fp8,turboquant_3.5,...] [--quality-tokens N]
                                   [--needle-lengths 1024,2048] [--needle-trials 30] [--out DIR]

For each kv_cache_dtype (auto = the reference; dtypes the platform cannot run are reported, not
fatal) it measures, with vLLM's LLM():
- decode-regime quality: prompt logprobs of windows of real text with prefill split into chunks of
  `chunk` tokens (max_num_batched_tokens), so every chunk after the first attends to earlier tokens
  through the compressed cache: perplexity of the text, top-1 agreement with the reference and
  KL(reference ‖ dtype) over the reference's top-20 tokens (vLLM returns no full distribution);
- needle in a haystack: a random 7-digit code at depths 0-100% of real text, asked for at the end,
  greedy generation through the compressed cache, exact-match accuracy per (length, depth);
- perplexity through lm-eval 0.4.13 (config "lm_eval": its vllm backend on a local
  loglikelihood_rolling task over pieces of the same text, same chunked prefill;
  quality/lm_eval_ppl.py): word perplexity and bits per byte;
- bytes per token per KV head (K and V).
Writes `<out>/<model>.md` (tables), `<out>/<model>.json` and `<out>/<model>.png` (quality vs bytes).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .codec import FORMATS
from .quality import corpus, lm_eval_ppl, prompt_logprobs
from .quality.shared_gpu import chunked_prefill_args, start_engine

ROOT = Path(__file__).resolve().parent.parent
NEEDLE = "The secret code is {code}. Remember it."
QUESTION = "What is the secret code mentioned in the text above? Answer with the 7-digit code only."


@dataclass
class DtypeResult:
    dtype: str
    bytes_per_token_head: float | None = None
    ppl: float | None = None
    kl_top20: float | None = None
    top1: float | None = None
    positions: int = 0
    needle: dict[str, float] = field(default_factory=dict)  # "length@depth" -> accuracy
    needle_hits: dict[str, list[int]] = field(default_factory=dict)  # per trial, prompt order
    lm_eval: dict[str, float] = field(default_factory=dict)  # word_perplexity, bits_per_byte, ...
    error: str | None = None
    seconds: float = 0.0


def bytes_per_token_head(dtype: str, head_dim: int) -> float | None:
    """K and V bytes per token and KV head; None for dtypes whose layout we do not know."""
    if dtype in FORMATS:
        return float(FORMATS[dtype].bytes_per_token_head(head_dim))
    if dtype in ("auto", "bfloat16", "float16"):
        return 4.0 * head_dim
    if dtype.startswith("fp8"):
        return 2.0 * head_dim
    if dtype.startswith("turboquant_"):  # vLLM's own presets (turboquant_4bit_nc, ...)
        try:
            from vllm.model_executor.layers.quantization.turboquant.config import (
                TurboQuantConfig)

            return float(TurboQuantConfig.from_cache_dtype(dtype, head_dim).slot_size_aligned)
        except (ImportError, ValueError, KeyError):
            return None
    return None


def resolve_model(name: str) -> str:
    from .models import BUILTIN

    return str(BUILTIN[name]()) if name in BUILTIN else name


@contextlib.contextmanager
def llm_engine(**llm_args):
    """vLLM's LLM(**llm_args), shut down and released on exit (several engines run in turn)."""
    from vllm import LLM

    llm = start_engine(lambda: LLM(**llm_args))
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _engine(model: str, dtype: str, chunk: int, max_model_len: int, device_args: dict):
    return llm_engine(model=model, kv_cache_dtype=dtype, max_model_len=max_model_len,
                      enable_prefix_caching=False, seed=0, max_logprobs=20,
                      **chunked_prefill_args(chunk, device_args))


def _quality_run(llm, windows: list[list[int]]) -> list:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=20, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    return [o.prompt_logprobs for o in outs]


def _perplexity(runs: list, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for lps, ids in zip(runs, windows):
        for pos, entry in enumerate(lps):
            if entry is None:
                continue
            nll -= entry[ids[pos]].logprob
            n += 1
    return math.exp(nll / max(n, 1))


def needle_prompts(tokenizer, lengths: list[int], depths: list[float], trials: int,
                   seed: int = 0) -> list[tuple[str, str, list[int]]]:
    """(cell, code, prompt token ids): haystacks of real text cut to `length` tokens in total,
    the needle sentence inserted at `depth` of the haystack, the question at the end."""
    rng = random.Random(seed)
    pool = tokenizer.encode("\n\n".join(corpus.documents()), add_special_tokens=False)
    head, tail = _chat_parts(tokenizer)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                code = str(rng.randrange(1_000_000, 10_000_000))
                needle = tokenizer.encode(" " + NEEDLE.format(code=code) + " ", add_special_tokens=False)
                room = length - len(needle) - len(tail) - len(head)
                start = rng.randrange(0, len(pool) - room)
                hay = pool[start:start + room]
                cut = int(round(depth * len(hay)))
                out.append((f"{length}@{int(depth * 100)}", code,
                            head + hay[:cut] + needle + hay[cut:] + tail))
    return out


def _chat_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids around the haystack: the chat template's user-turn opening, and the question plus
    the assistant-turn opening (plain text for models without a chat template)."""
    marker = "\x00HAYSTACK\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker + "\n\n" + QUESTION}], tokenize=False,
            add_generation_prompt=True)
    else:
        text = marker + "\n\n" + QUESTION + "\nAnswer:"
    head, tail = text.split(marker)
    return (tokenizer.encode(head, add_special_tokens=False),
            tokenizer.encode(tail, add_special_tokens=False))


def _needle_run(llm, prompts: list[tuple[str, str, list[int]]]) -> dict[str, list[int]]:
    """1/0 per trial and cell, in prompt order (every dtype gets the same prompts: paired)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=32, temperature=0)  # the model restates the question first
    outs = llm.generate([{"prompt_token_ids": p} for _, _, p in prompts], params, use_tqdm=False)
    hits: dict[str, list[int]] = {}
    for (cell, code, _), o in zip(prompts, outs):
        hits.setdefault(cell, []).append(int(code in o.outputs[0].text.replace(" ", "")))
    return hits


def paired_difference(hits: list[int], ref_hits: list[int]) -> tuple[float, float]:
    """Mean of hits - ref_hits over the same prompts, and its 95% confidence half-width (normal
    approximation of the per-prompt differences, each -1, 0 or 1). Pairing removes the prompts
    both get right or both miss, so it resolves far smaller differences than two accuracies."""
    if len(hits) != len(ref_hits) or not hits:
        raise ValueError("paired needle results need the same, non-empty list of prompts")
    d = [a - b for a, b in zip(hits, ref_hits)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, 1.96 * math.sqrt(var / n)


def evaluate(cfg: dict, log=print, on_result=None) -> tuple[list[DtypeResult], dict]:
    """Runs every dtype of cfg; on_result(results, meta) after each one (partial tables)."""
    from transformers import AutoConfig, AutoTokenizer

    model = resolve_model(cfg["model"])
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoConfig.from_pretrained(model)
    text_cfg = getattr(hf, "text_config", hf)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    window = cfg["window"]
    n_windows = max(1, math.ceil(cfg["quality_tokens"] / window))
    windows = corpus.token_windows(tok, n_windows, window)
    needle = cfg.get("needle") or {}
    lengths = [n for n in needle.get("lengths", []) if n + 16 <= cfg["max_model_len"]]
    prompts = needle_prompts(tok, lengths, needle.get("depths", []), needle.get("trials", 0))
    device_args = dict(cfg.get("engine_args", {}))
    lm_cfg = cfg.get("lm_eval") or {}
    lm_docs = []
    if lm_cfg.get("documents"):
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            raise SystemExit("the config's lm_eval section needs lm-eval: pip install "
                             "lm-eval==0.4.13 (not lm-eval[vllm]), or pass --lm-eval-docs 0") from e
        lm_docs = lm_eval_ppl.text_pieces(lm_cfg["documents"], lm_cfg.get("words", 400))
    device_args["enforce_eager"] = cfg.get("enforce_eager", True)
    dtypes = cfg["dtypes"]
    if dtypes[0] != "auto":
        dtypes = ["auto"] + [d for d in dtypes if d != "auto"]
    results, reference = [], None
    for i, dtype in enumerate(dtypes):
        r = DtypeResult(dtype, bytes_per_token_head(dtype, head_dim))
        t0 = time.time()
        log(f"[{i + 1}/{len(dtypes)}] {dtype}: quality over {n_windows} x {window} tokens "
            f"(chunks of {cfg['chunk']}), {len(prompts)} needle prompts, "
            f"{len(lm_docs)} lm-eval documents ...")
        try:
            with _engine(model, dtype, cfg["chunk"], cfg["max_model_len"], device_args) as llm:
                runs = _quality_run(llm, windows)
            if prompts:
                with _engine(model, dtype, cfg.get("needle_chunk", 2048), cfg["max_model_len"],
                             device_args) as llm:
                    r.needle_hits = _needle_run(llm, prompts)
                r.needle = {c: sum(v) / len(v) for c, v in r.needle_hits.items()}
            if lm_docs:
                r.lm_eval = lm_eval_ppl.perplexity(
                    model, dtype, lm_docs, max_model_len=lm_cfg.get("max_model_len", 1024),
                    chunk=cfg["chunk"], engine_args=device_args)
        except Exception as e:  # noqa: BLE001 - a dtype this platform cannot run is a result
            r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"    {dtype} failed: {r.error}")
            results.append(r)
            continue
        r.ppl = _perplexity(runs, windows)
        if reference is None:
            reference = runs
        agree = [prompt_logprobs.compare(a, b) for a, b in zip(reference, runs)]
        r.positions = sum(a.positions for a in agree)
        r.top1 = sum(a.top1 * a.positions for a in agree) / max(r.positions, 1)
        r.kl_top20 = sum(a.kl_topk * a.positions for a in agree) / max(r.positions, 1)
        r.seconds = time.time() - t0
        needle_mean = sum(r.needle.values()) / len(r.needle) if r.needle else float("nan")
        lm_word = r.lm_eval.get("word_perplexity", float("nan"))
        log(f"    ppl {r.ppl:.3f}  top-1 {r.top1:.3f}  KL {r.kl_top20:.4f}  "
            f"needle {needle_mean:.2f}  lm-eval word ppl {lm_word:.3f}  ({r.seconds:.0f} s)")
        results.append(r)
        if on_result:
            on_result(results, _meta(cfg, head_dim, n_windows, window, lengths, needle))
    return results, _meta(cfg, head_dim, n_windows, window, lengths, needle)


def _meta(cfg, head_dim, n_windows, window, lengths, needle) -> dict:
    lm_cfg = cfg.get("lm_eval") or {}
    return dict(model=cfg["model"], head_dim=head_dim, windows=n_windows, window=window,
                chunk=cfg["chunk"], needle_lengths=lengths, needle_depths=needle.get("depths", []),
                needle_trials=needle.get("trials", 0), date=str(datetime.date.today()),
                device=_device_name(), lm_eval_documents=lm_cfg.get("documents", 0),
                lm_eval_words=lm_cfg.get("words", 400),
                lm_eval_max_model_len=lm_cfg.get("max_model_len", 1024),
                commit=commit_id(), options=plugin_options())


def commit_id() -> str:
    """Short commit of this checkout, "-dirty" when tracked files differ from it (a tree copied
    over an older .git, as on the GPU machine, shows as such); TQ_COMMIT overrides."""
    if os.environ.get("TQ_COMMIT"):
        return os.environ["TQ_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def plugin_options() -> dict[str, str]:
    """The TURBOQUANT_* settings of this run: they change what a format measures, and the
    command line does not show them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TURBOQUANT_")}


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return f"CPU ({os.cpu_count()} cores)"


def markdown(results: list[DtypeResult], meta: dict, command: str) -> str:
    ref = next((r for r in results if r.dtype == "auto" and r.ppl), None)
    settings = "".join(f"{k}={v} " for k, v in meta.get("options", {}).items())
    lines = [f"`{settings}{command}` on {meta['date']}, {meta['device']}, "
             f"commit {meta.get('commit', 'unknown')}: model {meta['model']} "
             f"(head_dim {meta['head_dim']}); quality over {meta['windows']} x {meta['window']} "
             f"tokens of real text, prefill in chunks of {meta['chunk']} tokens "
             f"(every later chunk reads the compressed cache); KL over the reference's top-20.", "",
             "| kv_cache_dtype | bytes/token/KV head | PPL | PPL vs auto | mean KL (top-20) | "
             "top-1 agreement | needle accuracy |", "|---|---|---|---|---|---|---|"]
    for r in results:
        size = f"{r.bytes_per_token_head:.0f}" if r.bytes_per_token_head else "?"
        if r.error:
            lines.append(f"| {r.dtype} | {size} | not run: {r.error} | | | | |")
            continue
        rel = f"{100 * (r.ppl / ref.ppl - 1):+.1f}%" if ref else "n/a"
        needle = f"{sum(r.needle.values()) / len(r.needle):.3f}" if r.needle else "n/a"
        lines.append(f"| {r.dtype} | {size} | {r.ppl:.3f} | {rel} | "
                     f"{r.kl_top20:.4f} | {r.top1:.3f} | {needle} |")
    cells = sorted({c for r in results for c in r.needle},
                   key=lambda c: tuple(int(x) for x in c.split("@")))
    if cells:
        lines += ["", f"Needle in a haystack, exact match per length@depth% "
                  f"({meta['needle_trials']} trials per cell):", "",
                  "| kv_cache_dtype | " + " | ".join(cells) + " |",
                  "|---|" + "---|" * len(cells)]
        for r in results:
            if r.needle:
                lines.append(f"| {r.dtype} | " + " | ".join(f"{r.needle.get(c, float('nan')):.2f}"
                                                         for c in cells) + " |")
        lengths = sorted({int(c.split("@")[0]) for c in cells})
        lines += ["", "Needle accuracy per length (mean over depths):", "",
                  "| kv_cache_dtype | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        for r in results:
            if r.needle:
                lines.append(f"| {r.dtype} | " + " | ".join(
                    f"{_mean(v for c, v in r.needle.items() if c.startswith(f'{n}@')):.3f}"
                    for n in lengths) + " |")
        lines += _needle_vs_reference(results, lengths)
    lm_rows = [r for r in results if r.lm_eval]
    if lm_rows:
        lm_ref = next((r for r in lm_rows if r.dtype == "auto"), None)
        lines += ["", f"lm-eval 0.4.13 (vllm backend, local loglikelihood_rolling task): "
                  f"{meta['lm_eval_documents']} pieces of ~{meta['lm_eval_words']} words of the "
                  f"same text, rolling windows of {meta['lm_eval_max_model_len']} tokens, prefill "
                  f"in chunks of {meta['chunk']}:", "",
                  "| kv_cache_dtype | word perplexity | vs auto | bits per byte | vs auto |",
                  "|---|---|---|---|---|"]
        for r in lm_rows:
            w, b = r.lm_eval["word_perplexity"], r.lm_eval["bits_per_byte"]
            rel_w = f"{100 * (w / lm_ref.lm_eval['word_perplexity'] - 1):+.1f}%" if lm_ref else ""
            rel_b = f"{100 * (b / lm_ref.lm_eval['bits_per_byte'] - 1):+.2f}%" if lm_ref else ""
            lines.append(f"| {r.dtype} | {w:.3f} | {rel_w} | {b:.4f} | {rel_b} |")
    return "\n".join(lines) + "\n"


def _needle_vs_reference(results: list[DtypeResult], lengths: list[int]) -> list[str]:
    """Per length, each dtype's accuracy minus auto's over the same prompts, in points, with a 95%
    confidence interval: what "within 2 points of bf16" can be checked against."""
    ref = next((r for r in results if r.dtype == "auto" and r.needle_hits), None)
    rows = [r for r in results if r.needle_hits and r is not ref]
    if ref is None or not rows:
        return []

    def per_length(r: DtypeResult, n: int) -> list[int]:
        return [x for c in sorted(r.needle_hits) if c.startswith(f"{n}@")
                for x in r.needle_hits[c]]

    out = ["", "Needle accuracy minus auto's over the same prompts, points (95% confidence "
           "interval of the paired difference):", "",
           "| kv_cache_dtype | " + " | ".join(map(str, lengths)) + " |",
           "|---|" + "---|" * len(lengths)]
    for r in rows:
        cells = []
        for n in lengths:
            mean, half = paired_difference(per_length(r, n), per_length(ref, n))
            cells.append(f"{100 * mean:+.1f} ({100 * (mean - half):+.1f} to "
                         f"{100 * (mean + half):+.1f})")
        out.append(f"| {r.dtype} | " + " | ".join(cells) + " |")
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def plot(results: list[DtypeResult], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ok = [r for r in results if not r.error and r.bytes_per_token_head]
    for ax, key, label in ((axes[0], "kl_top20", "mean KL vs bf16 (top-20)"),
                           (axes[1], "top1", "top-1 agreement with bf16")):
        for r in ok:
            ax.scatter(r.bytes_per_token_head, getattr(r, key))
            ax.annotate(r.dtype, (r.bytes_per_token_head, getattr(r, key)), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("bytes per token per KV head")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['model']} (head_dim {meta['head_dim']}), decode regime, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def load_config(args: argparse.Namespace) -> dict:
    cfg = json.loads(Path(args.config).read_text())
    for key in ("model", "quality_tokens", "window", "chunk"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.dtypes:
        cfg["dtypes"] = args.dtypes.split(",")
    needle = cfg.setdefault("needle", {})
    if args.needle_lengths is not None:
        needle["lengths"] = [int(x) for x in args.needle_lengths.split(",") if x]
    if args.needle_depths is not None:
        needle["depths"] = [float(x) / 100 for x in args.needle_depths.split(",") if x]
    if args.needle_trials is not None:
        needle["trials"] = args.needle_trials
    if args.lm_eval_docs is not None:
        cfg.setdefault("lm_eval", {})["documents"] = args.lm_eval_docs
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_turboquant.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "eval-smollm2.json"))
    ap.add_argument("--model", help="'smollm2' (built in), a local HF folder or a hub name")
    ap.add_argument("--dtypes", help="comma-separated kv_cache_dtypes (auto is always run first)")
    ap.add_argument("--quality-tokens", dest="quality_tokens", type=int)
    ap.add_argument("--window", type=int, help="tokens per quality prompt")
    ap.add_argument("--chunk", type=int, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--needle-lengths", help="comma-separated prompt lengths ('' for none)")
    ap.add_argument("--needle-depths", help="comma-separated depths in percent")
    ap.add_argument("--needle-trials", type=int)
    ap.add_argument("--lm-eval-docs", dest="lm_eval_docs", type=int,
                    help="documents for the lm-eval perplexity (0: skip it; needs lm-eval==0.4.13)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "eval"))
    args = ap.parse_args(argv)
    cfg = load_config(args)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # the README's CPU settings; eager (no compile) is faster here
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
        cfg.setdefault("enforce_eager", True)
    else:
        cfg.setdefault("enforce_eager", False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(str(cfg["model"])).name.replace("/", "_")
    command = "python -m vllm_turboquant.eval " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(results: list[DtypeResult], meta: dict) -> str:
        text = markdown(results, meta, command.strip())
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(
            {"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
        return text

    results, meta = evaluate(cfg, log=lambda s: print(s, flush=True), on_result=write)
    text = write(results, meta)
    plotted = plot(results, meta, out / f"{stem}.png")
    print(text)
    print(f"wrote {out / (stem + '.md')}" + (f", {out / (stem + '.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
