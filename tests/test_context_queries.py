"""Multi-token steps on CUDA split the queries that read cached context into single-token rows
(decode tiles, split-K) and multi-token rows (query tiles); fresh prompts read no pages."""
import pytest
import torch

pytest.importorskip("vllm")

from vllm_turboquant.vllm_glue.backend import _context_queries  # noqa: E402


def test_decodes_and_chunks_form_separate_groups_and_fresh_prompts_none():
    # requests: decode, decode, fresh 64-token prompt, decode, 64-token chunk over 136 cached
    qsl = torch.tensor([0, 1, 2, 66, 67, 131], dtype=torch.int32)
    seq_lens = torch.tensor([100, 50, 64, 10, 200], dtype=torch.int32)
    decodes, chunks = _context_queries(qsl, seq_lens, torch.device("cpu"))
    assert decodes.tokens.tolist() == [0, 1, 66]
    assert decodes.query_start_loc.tolist() == [0, 1, 2, 2, 3, 3]
    assert decodes.max_query_len == 1 and not decodes.every_token
    assert chunks.tokens.tolist() == list(range(67, 131))
    assert chunks.query_start_loc.tolist() == [0, 0, 0, 0, 0, 64]
    assert chunks.max_query_len == 64 and chunks.num_step_tokens == 131


def test_a_step_of_only_fresh_prompts_reads_no_pages_and_one_kind_is_one_group():
    qsl = torch.tensor([0, 5, 12], dtype=torch.int32)
    assert _context_queries(qsl, torch.tensor([5, 7]), torch.device("cpu")) == ()
    (only,) = _context_queries(qsl, torch.tensor([9, 20]), torch.device("cpu"))
    assert only.every_token and only.rows == slice(0, 12) and only.max_query_len == 7
