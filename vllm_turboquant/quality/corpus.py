"""Real English text that ships with the package (see vllm_turboquant/data/README.md)."""
from __future__ import annotations

import functools
import gzip
import json
from importlib import resources


# The plugin calibrates every layer on this document when an engine starts (vllm_glue/
# engine_calibration.py). The evaluations read the text from its beginning (token_windows, the
# lm-eval pieces), never this far, so calibration and measurement never share tokens.
CALIBRATION_SOURCE = "tutorial/classes.rst.txt"


@functools.lru_cache(maxsize=1)
def _records() -> tuple[tuple[str, str], ...]:
    raw = resources.files("vllm_turboquant") / "data" / "python_docs_prose.jsonl.gz"
    with gzip.open(raw.open("rb"), "rt", encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        return tuple((r["source"], r["text"]) for r in rows)


def documents() -> tuple[str, ...]:
    return tuple(text for _, text in _records())


def calibration_text() -> str:
    return dict(_records())[CALIBRATION_SOURCE]


def calibration_ids(tokenizer, tokens: int) -> list[int]:
    """The engine-start calibration prompt: the first `tokens` ids of the calibration document,
    with the tokenizer's special tokens (BOS) as a real prompt has them."""
    return tokenizer.encode(calibration_text())[:tokens]


def token_windows(tokenizer, num_windows: int, window: int, offset_docs: int = 0) -> list[list[int]]:
    """`num_windows` consecutive, non-overlapping windows of `window` tokens of the running text."""
    ids: list[int] = []
    need = num_windows * window
    docs = documents()
    for i in range(len(docs)):
        ids += tokenizer.encode(docs[(offset_docs + i) % len(docs)] + "\n\n", add_special_tokens=False)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"built-in text has {len(ids)} tokens, {need} requested")
    return [ids[i * window:(i + 1) * window] for i in range(num_windows)]
