"""Outlier channels are chosen deterministically from observed vectors."""
import torch

from vllm_turboquant.codec import LayerKVCodec, default_split, page_layout, split_from_vectors


def test_planted_outlier_channels_are_found(gen):
    x = torch.randn(64, 2, 64, generator=gen)
    hot = [[3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59],
           list(range(48, 64))]
    for h, chans in enumerate(hot):
        x[:, h, chans] *= 10
    perm = split_from_vectors(x)
    for h, chans in enumerate(hot):
        assert perm[h, :16].tolist() == sorted(chans)
        assert sorted(perm[h].tolist()) == list(range(64))


def test_ties_break_towards_the_lower_channel():
    perm = split_from_vectors(torch.ones(4, 1, 64))
    assert perm[0, :16].tolist() == list(range(16))


def test_default_split_is_the_low_frequency_rope_pairs():
    perm = default_split(128, 2)
    assert perm[0, :32].tolist() == list(range(48, 64)) + list(range(112, 128))
    assert torch.equal(perm[0], perm[1])


def test_calibration_happens_once(gen):
    codec = LayerKVCodec(page_layout("turboquant_3.5", 64, 16, 1))
    first = torch.randn(10, 1, 64, generator=gen)
    first[:, :, :16] *= 10
    codec.calibrate(first, first)
    before = codec.key_perm.clone()
    codec.calibrate(torch.randn(10, 1, 64, generator=gen) * torch.arange(64), first)
    assert torch.equal(codec.key_perm, before)


def test_calibration_over_several_writes_equals_one_over_all_of_them(gen):
    # vLLM writes a prompt chunk by chunk; calibrating on the chunks' union must not depend on
    # how it was cut (the centred energy comes from running sums).
    key = torch.randn(96, 2, 64, generator=gen) * torch.linspace(0.5, 3, 64) + 2.0
    value = torch.randn(96, 2, 64, generator=gen) * torch.linspace(3, 0.5, 64)
    whole = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 2))
    whole.calibrate(key, value)
    pieces = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 2))
    for lo, hi in ((0, 7), (7, 64), (64, 96)):
        pieces.observe(key[lo:hi], value[lo:hi])
    assert not pieces.calibrated and pieces.observed_tokens == 96
    pieces.finish_calibration()
    assert pieces.calibrated and pieces.observed_tokens == 0
    assert torch.equal(pieces.key_perm, whole.key_perm)
    assert torch.equal(pieces.value_perm, whole.value_perm)
    torch.testing.assert_close(pieces.key_mean, key.mean(0))
    # centred keys: the split ranks channels by variance, not by raw energy
    assert torch.equal(whole.key_perm, split_from_vectors(key - key.mean(0)))


def test_finishing_without_observations_leaves_the_default_split():
    codec = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 1))
    codec.finish_calibration()
    assert not codec.calibrated and torch.equal(codec.key_perm, default_split(64, 1))


def _sinky_keys(gen, sink_sign: float) -> torch.Tensor:
    """Head 0: a first token (the sink) along +mean; head 1: along sink_sign · mean."""
    key = torch.randn(64, 2, 64, generator=gen) * 0.5
    key[:, :, :8] += 3.0                      # a large shared component: the mean
    key[0, 0, :8] = 9.0                       # head 0's sink, aligned with it
    key[0, 1, :8] = 9.0 * sink_sign           # head 1's sink
    return key


def test_key_mean_is_removed_where_it_shortens_the_sink(gen):
    codec = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 2))
    key = _sinky_keys(gen, +1.0)
    codec.calibrate(key, key)
    torch.testing.assert_close(codec.key_mean, key.mean(0))


def test_key_mean_is_kept_where_removing_it_would_lengthen_the_sink(gen):
    # Head 1's sink points away from the mean: centring would make its stored vector ~4x
    # longer, and its error with it, so head 1 keeps μ = 0 and ranks channels by raw energy.
    codec = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 2))
    key = _sinky_keys(gen, -1.0)
    codec.calibrate(key, key)
    torch.testing.assert_close(codec.key_mean[0], key[:, 0].mean(0))
    assert not codec.key_mean[1].any()
    assert torch.equal(codec.key_perm[1], split_from_vectors(key[:, 1:2])[0])


def test_the_sink_is_the_first_token_observed(gen):
    codec = LayerKVCodec(page_layout("turboquant_3.5_mse", 64, 16, 2))
    key = _sinky_keys(gen, -1.0)
    codec.observe(key[:5], key[:5])
    codec.observe(key[5:], key[5:])
    codec.finish_calibration()
    assert codec.key_mean[0].any() and not codec.key_mean[1].any()
