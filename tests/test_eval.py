"""The reduced evaluation (configs/eval-ci.json) through vLLM on the CPU: it must run end to end,
write its table, JSON and plot, and no format may regress past the bounds below.

Bounds sit ~30-50% outside what this run measured on 2026-11-22 with the newest 64 tokens exact
(3.5_mse: PPL +1.6%, KL 0.030, top-1 0.90; 2.5_mse: +10.1%, 0.083, 0.84), so they catch
regressions, not noise. (Before the exact newest tokens: 3.5_mse +9.8%, 0.077, 0.84.)
lm-eval's word perplexity over 2 x 250 words (rolling 512-token windows, 64-token chunks) was
+4.2% for 3.5_mse (bits per byte +1.0%) and +11.0% for 2.5_mse (+2.5%) on 2026-11-23."""
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_turboquant import eval as tq_eval  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = {  # dtype: (max PPL increase vs auto, max mean KL (top-20), min top-1 agreement)
    "turboquant_3.5_mse": (0.04, 0.045, 0.86),
    "turboquant_3.5_kb": (0.04, 0.045, 0.86),
    "turboquant_2.5_mse": (0.15, 0.12, 0.79),
}
LM_EVAL_WORD_PPL = {"turboquant_3.5_mse": 0.07, "turboquant_3.5_kb": 0.07,
                    "turboquant_2.5_mse": 0.18}  # max increase


def test_reduced_eval_runs_and_no_format_regresses(tmp_path, report):
    assert tq_eval.main(["--config", str(ROOT / "configs" / "eval-ci.json"),
                         "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "smollm2.json").read_text())
    assert (tmp_path / "smollm2.md").read_text().count("| turboquant_") >= 2
    assert (tmp_path / "smollm2.png").stat().st_size > 10_000
    rows = {r["dtype"]: r for r in data["results"]}
    ref = rows["auto"]
    assert ref["error"] is None and ref["top1"] == 1.0
    for dtype, (ppl_up, kl, top1) in BOUNDS.items():
        r = rows[dtype]
        assert r["error"] is None, r["error"]
        report(f"eval-ci {dtype}: PPL {r['ppl'] / ref['ppl'] - 1:+.1%}, KL {r['kl_top20']:.4f}, "
               f"top-1 {r['top1']:.3f}, needle {r['needle']}")
        assert r["ppl"] <= ref["ppl"] * (1 + ppl_up)
        assert r["kl_top20"] <= kl
        assert r["top1"] >= top1
        assert r["bytes_per_token_head"] < ref["bytes_per_token_head"] / 4
        # lm-eval's harness, same text and regime: its own perplexity bound per format
        word = r["lm_eval"]["word_perplexity"] / ref["lm_eval"]["word_perplexity"] - 1
        report(f"eval-ci {dtype}: lm-eval word perplexity {word:+.1%}, bits per byte "
               f"{r['lm_eval']['bits_per_byte'] / ref['lm_eval']['bits_per_byte'] - 1:+.2%}")
        assert 0 < r["lm_eval"]["bits_per_byte"] and word <= LM_EVAL_WORD_PPL[dtype]
    assert "lm-eval 0.4.13" in (tmp_path / "smollm2.md").read_text()


def test_needle_prompts_hide_the_code_at_the_requested_depth():
    from transformers import AutoTokenizer

    from vllm_turboquant.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(str(smollm2_path()))
    prompts = tq_eval.needle_prompts(tok, [512], [0.0, 1.0], 2, seed=3)
    assert len(prompts) == 4
    for cell, code, ids in prompts:
        assert len(ids) <= 512 and len(ids) >= 500
        text = tok.decode(ids)
        assert text.count(code) == 1 and text.rstrip().endswith("assistant")
        where = text.index(code) / len(text)
        assert (where < 0.2) if cell.endswith("@0") else (where > 0.7)


def test_needle_difference_is_paired_over_the_same_prompts():
    same = [1, 0, 1, 1, 0]
    assert tq_eval.paired_difference(same, same) == (0.0, 0.0)
    # 8 of 40 prompts lost, none gained: -20 points, and the interval excludes 0
    mean, half = tq_eval.paired_difference([1] * 12 + [0] * 28, [1] * 20 + [0] * 20)
    assert mean == pytest.approx(-0.2) and 0 < half < 0.2
    # the same accuracies from 8 lost and 8 gained prompts: no evidence either way
    mean, half = tq_eval.paired_difference([0] * 8 + [1] * 8 + [0] * 24, [1] * 8 + [0] * 32)
    assert mean == pytest.approx(0.0) and half > 0.1
    with pytest.raises(ValueError, match="same"):
        tq_eval.paired_difference([1, 0], [1])


def test_markdown_reports_needle_difference_per_length():
    ref = tq_eval.DtypeResult("auto", 512, ppl=10.0, kl_top20=0.0, top1=1.0,
                              needle_hits={"1024@0": [1, 1], "1024@100": [1, 0],
                                           "4096@0": [0, 0], "4096@100": [1, 1]})
    fmt = tq_eval.DtypeResult("turboquant_3.5_mse", 116, ppl=10.1, kl_top20=0.02, top1=0.9,
                              needle_hits={"1024@0": [1, 0], "1024@100": [1, 0],
                                           "4096@0": [0, 0], "4096@100": [1, 1]})
    for r in (ref, fmt):
        r.needle = {c: sum(v) / len(v) for c, v in r.needle_hits.items()}
    meta = dict(date="today", device="cpu", model="m", head_dim=64, windows=1, window=8, chunk=4,
                needle_trials=2)
    text = tq_eval.markdown([ref, fmt], meta, "cmd")
    row = next(line for line in text.splitlines()
               if line.startswith("| turboquant_3.5_mse | -25.0"))
    assert row.split(" | ")[2].startswith("+0.0 (+0.0 to +0.0)")  # 4096: no prompt differs


def test_markdown_names_the_commit_and_the_plugin_settings(monkeypatch):
    monkeypatch.setenv("TQ_COMMIT", "abc1234")
    monkeypatch.setenv("TURBOQUANT_CENTER_KEYS", "0")
    meta = dict(date="today", device="cpu", model="m", head_dim=64, windows=1, window=8, chunk=4,
                needle_trials=0, commit=tq_eval.commit_id(), options=tq_eval.plugin_options())
    ref = tq_eval.DtypeResult("auto", 512, ppl=10.0, kl_top20=0.0, top1=1.0)
    first = tq_eval.markdown([ref], meta, "python -m vllm_turboquant.eval").splitlines()[0]
    assert first.startswith("`TURBOQUANT_CENTER_KEYS=0 python -m vllm_turboquant.eval`")
    assert "commit abc1234" in first
