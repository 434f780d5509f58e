"""Multi-token steps on CUDA split the queries that read cached context into single-token rows
(decode tiles, split-K), short multi-token rows (query tiles) and long chunks (their context
decoded once, in pieces of bounded size, for FlashAttention); fresh prompts read no pages."""
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


def _long_step():
    # requests: decode, 8-token speculative step, 64-token chunk over 136 cached, fresh prompt,
    # 100-token chunk over 250 cached
    qsl = torch.tensor([0, 1, 9, 73, 83, 183], dtype=torch.int32)
    seq_lens = torch.tensor([40, 30, 200, 10, 350], dtype=torch.int32)
    return qsl, seq_lens


def test_long_chunks_form_their_own_group_and_shorter_rows_keep_the_paged_kernel():
    qsl, seq_lens = _long_step()
    cpu = torch.device("cpu")
    decodes, short, long = _context_queries(qsl, seq_lens, cpu)
    assert decodes.tokens.tolist() == [0] and short.tokens.tolist() == list(range(1, 9))
    assert long.tokens.tolist() == list(range(9, 73)) + list(range(83, 183))
    assert long.query_start_loc.tolist() == [0, 0, 0, 64, 64, 164] and long.pieces == ()


def test_long_contexts_are_cut_into_pieces_of_bounded_size():
    pytest.importorskip("triton")
    qsl, seq_lens = _long_step()
    cpu = torch.device("cpu")
    real = seq_lens.clone()
    real[4] = 340  # the host lengths are upper bounds: the device knows row 4 has 240 cached
    *_, long = _context_queries(qsl, seq_lens, cpu, qsl, real, dense_tokens=100)
    spans = [(p.span.starts.tolist(), p.span.cu_keys.tolist()) for p in long.pieces]
    # contexts 136 and 250 (240 really) → [0,100) | [100,136) + [0,64) | [64,164) | [164,250)
    assert spans == [([0, 0, 0, 0, 0], [0, 0, 0, 100, 100, 100]),
                     ([0, 0, 100, 0, 0], [0, 0, 0, 36, 36, 100]),
                     ([0, 0, 0, 0, 64], [0, 0, 0, 0, 0, 100]),
                     ([0, 0, 0, 0, 164], [0, 0, 0, 0, 0, 76])]
    assert [p.span.num_keys for p in long.pieces] == [100, 100, 100, 86]
    assert [p.queries.tokens.tolist()[0] for p in long.pieces] == [9, 9, 83, 83]
    assert long.pieces[1].queries.tokens.tolist() == list(range(9, 73)) + list(range(83, 183))
    assert long.pieces[1].span.max_keys == 64
