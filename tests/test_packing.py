"""Bit-plane packing and page writes round-trip exactly."""
import pytest
import torch

from vllm_turboquant.codec import FORMATS, LayerKVCodec, page_layout
from vllm_turboquant.codec.packing import pack_bitplanes, unpack_bitplanes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [16, 48, 96, 192])
def test_bitplane_round_trip(bits, n, gen):
    codes = torch.randint(0, 1 << bits, (7, 3, n), generator=gen, dtype=torch.uint8)
    packed = pack_bitplanes(codes, bits)
    assert packed.shape == (7, 3, bits * n // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bitplanes(packed, bits, n), codes)


def test_bitplane_layout_is_the_documented_one():
    codes = torch.zeros(16, dtype=torch.uint8)
    codes[9] = 0b101  # channel 9: byte 1, bit 1, in planes 0 and 2
    packed = pack_bitplanes(codes, 3)
    assert packed.tolist() == [0, 0b10, 0, 0, 0, 0b10]


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_pages_round_trip_the_quantized_fields(name, d, gen):
    lay = page_layout(name, d, 16, 2)
    codec = LayerKVCodec(lay)
    k, v = torch.randn(2, 37, 2, d, generator=gen)
    codec.calibrate(k, v)
    cache = torch.zeros(6, lay.page_bytes, dtype=torch.uint8)
    slots = torch.randperm(6 * 16, generator=gen)[:37]
    codec.write(cache, slots, k, v)
    # Read the slots back through whole blocks and compare field by field with the encoder.
    rows = codec.read_blocks(cache, torch.arange(6))
    stored = {name: r[slots] for name, r in rows.items()}
    encoded = codec.encode(k, v)
    for region in lay.regions:
        assert torch.equal(stored[region], encoded[region]), region


def test_padding_slots_are_skipped(gen):
    lay = page_layout("turboquant_3.5", 64, 16, 1)
    codec = LayerKVCodec(lay)
    cache = torch.full((2, lay.page_bytes), 0xAB, dtype=torch.uint8)
    k, v = torch.randn(2, 4, 1, 64, generator=gen)
    codec.write(cache, torch.tensor([-1, 3, -1, -1]), k, v)
    touched = (cache != 0xAB).view(2, -1).any(-1)
    assert touched.tolist() == [True, False]
    assert (cache != 0xAB).sum() <= lay.slot_bytes
