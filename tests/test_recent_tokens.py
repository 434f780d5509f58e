"""Each sequence's newest tokens are read exactly; anything the buffer cannot vouch for is read
from the compressed pages instead (never another request's tokens)."""
import pytest
import torch

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, dense_attention, page_layout, paged_attention

from .test_packed_attention import build_cache

D, H, GQA, BS = 64, 2, 3, 16


def _slots(table_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return table_row.long()[positions // BS] * BS + positions % BS


def _stage_prompt(recent, codec, cache, table, row, kv, length):
    """Stage sequence `row` as if its whole prompt of `length` tokens was computed in one step."""
    pos = torch.arange(length)
    qsl = torch.zeros(row + 2, dtype=torch.int32)
    qsl[row + 1] = length
    lens = torch.zeros(row + 1, dtype=torch.int32)
    lens[row] = length
    slots = _slots(table[row], pos)
    recent.write(codec, cache, slots, recent.entries(slots, qsl, lens), *kv)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def setup(gen):
    codec = LayerKVCodec(page_layout("turboquant_3.5", D, BS, H))
    codec.calibrate(torch.randn(32, H, D, generator=gen) * 2 + 0.3, torch.randn(32, H, D, generator=gen))
    seq_lens = [30, 50]
    cache, table, dense = build_cache(codec, seq_lens, gen, num_blocks=12)
    query = torch.randn(2, H * GQA, D, generator=gen)
    args = (table, torch.tensor(seq_lens), torch.arange(3), D ** -0.5)
    return codec, cache, table, dense, query, args


def _both_staged(setup, rows):
    """Attention with both prompts staged in a buffer of `rows` rows, and without the buffer."""
    codec, cache, table, dense, query, args = setup
    recent = RecentTokens(rows=rows, window=32, num_kv_heads=H, head_dim=D)
    for row, length in enumerate((30, 50)):
        _stage_prompt(recent, codec, cache, table, row, dense[row], length)
    return (paged_attention(codec, query, cache, *args, recent=recent),
            paged_attention(codec, query, cache, *args))


def test_tokens_inside_the_window_are_exact_and_older_ones_compressed(setup):
    codec, cache, table, dense, query, args = setup
    got, plain = _both_staged(setup, rows=2)
    # Sequence 0 (30 tokens) fits in the window: its decode step is exact attention (fp16 copies).
    k, v = dense[0]
    assert _rel(got[:1], dense_attention(query[:1], k, v, D ** -0.5)) < 2e-3
    # Sequence 1: positions 18..49 exact, 0..17 from the pages.
    k_hat, v_hat = codec.read_tokens(cache, table[1, :4], 50)
    k_mix, v_mix = torch.cat([k_hat[:18], dense[1][0][18:]]), torch.cat([v_hat[:18], dense[1][1][18:]])
    assert _rel(got[1:], dense_attention(query[1:], k_mix, v_mix, D ** -0.5)) < 2e-3
    assert _rel(plain[1:], got[1:]) > 0.02  # the exact copies matter


def test_an_entry_left_by_another_request_is_not_read(setup, gen):
    codec, cache, table, dense, query, args = setup
    recent = RecentTokens(rows=2, window=32, num_kv_heads=H, head_dim=D)
    _stage_prompt(recent, codec, cache, table, 0, dense[0], 30)
    # The request finished; its blocks now hold another request's tokens (same slots), written
    # while that request sat in another batch row, and that request then moved to row 0.
    other = (torch.randn(30, H, D, generator=gen), torch.randn(30, H, D, generator=gen))
    codec.write(cache, _slots(table[0], torch.arange(30)), *other)
    got = paged_attention(codec, query, cache, *args, recent=recent)
    plain = paged_attention(codec, query, cache, *args)
    torch.testing.assert_close(got, plain)


def test_rows_beyond_the_buffer_read_pages_only(setup):
    got, plain = _both_staged(setup, rows=1)
    torch.testing.assert_close(got[1:], plain[1:])
    assert _rel(got[:1], plain[:1]) > 0.02


def test_entries_stage_each_sequences_newest_tokens_only():
    recent = RecentTokens(rows=4, window=4, num_kv_heads=1, head_dim=D)
    # decode of a 9-token sequence, a 6-token chunk ending at position 19, padding
    qsl = torch.tensor([0, 1, 7], dtype=torch.int32)
    seq_lens = torch.tensor([9, 20], dtype=torch.int32)
    slots = torch.tensor([100, 200, 201, 202, 203, 204, 205, -1])
    entries = recent.entries(slots, qsl, seq_lens).tolist()
    # position 8 → row 0 entry 8 % 4; positions 14..19: only 16..19 staged, row 1 entries 4 + p % 4
    assert entries == [0, -1, -1, 4, 5, 6, 7, -1]


def test_copies_follow_their_request_to_another_batch_row(setup):
    """Written while the sequences sat in batch rows 0 and 1, read after the batch swapped them:
    with the ring map following the requests the copies are still read; with a map that stayed
    put each row would find the other request's entries, and reads compressed pages."""
    codec, cache, table, dense, query, args = setup
    ring_of_row = torch.tensor([0, 1], dtype=torch.int32)
    recent = RecentTokens(rows=2, window=32, num_kv_heads=H, head_dim=D, ring_of_row=ring_of_row)
    for row, length in enumerate((30, 50)):
        _stage_prompt(recent, codec, cache, table, row, dense[row], length)
    expected = paged_attention(codec, query, cache, *args, recent=recent)
    swap = torch.tensor([1, 0])
    swapped_args = (args[0][swap], args[1][swap], *args[2:])
    ring_of_row.copy_(torch.tensor([1, 0], dtype=torch.int32))  # the requests' rings, new order
    got = paged_attention(codec, query[swap], cache, *swapped_args, recent=recent)
    torch.testing.assert_close(got, expected[swap])
    ring_of_row.copy_(torch.tensor([0, 1], dtype=torch.int32))  # a map indexed by batch row
    stale = paged_attention(codec, query[swap], cache, *swapped_args, recent=recent)
    torch.testing.assert_close(stale, paged_attention(codec, query[swap], cache, *swapped_args))


def test_entries_go_to_the_ring_of_each_batch_row():
    ring_of_row = torch.tensor([3, -1], dtype=torch.int32)
    recent = RecentTokens(rows=4, window=4, num_kv_heads=1, head_dim=D, ring_of_row=ring_of_row)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    entries = recent.entries(torch.tensor([100, 200]), qsl, torch.tensor([9, 20], dtype=torch.int32))
    assert entries.tolist() == [3 * 4 + 8 % 4, -1]  # row 1 has no ring: not staged
