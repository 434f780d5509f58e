"""Real English text that ships with the package (see vllm_turboquant/data/README.md)."""
from __future__ import annotations

import functools
import gzip
import json
from importlib import resources


@functools.lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    raw = resources.files("vllm_turboquant") / "data" / "python_docs_prose.jsonl.gz"
    with gzip.open(raw.open("rb"), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


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
