"""Agreement between two vLLM runs of the same prompt, from their prompt logprobs.

vLLM returns, per prompt position, the logprobs of the top-k tokens (k = `prompt_logprobs`) plus
the real token. Top-1 agreement compares the rank-1 tokens; the KL is truncated to the reference's
top-k (a token missing from the other run's list gets that run's smallest listed logprob, an upper
bound on its probability), so it is a lower-resolution estimate of the full-vocabulary KL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class PromptAgreement:
    top1: float
    kl_topk: float
    positions: int


def _top1(entry) -> int:
    return min(entry.items(), key=lambda kv: kv[1].rank)[0]


def compare(reference: list, test: list, last: int | None = None) -> PromptAgreement:
    """Compare two `RequestOutput.prompt_logprobs` lists over their common trailing positions
    (a prefix-cache hit returns entries only for the positions it computed)."""
    ref = [e for e in reference if e is not None]
    tst = [e for e in test if e is not None]
    n = min(len(ref), len(tst)) if last is None else last
    ref, tst = ref[-n:], tst[-n:]
    agree, kl = 0, 0.0
    for r, t in zip(ref, tst):
        agree += _top1(r) == _top1(t)
        floor = min(lp.logprob for lp in t.values())
        for tok, lp in r.items():
            p = math.exp(lp.logprob)
            q = t[tok].logprob if tok in t else floor
            kl += p * (lp.logprob - q)
    return PromptAgreement(agree / max(n, 1), kl / max(n, 1), n)
