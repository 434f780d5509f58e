"""Byte sizes and page layout are exact and kernel-friendly."""
import pytest

from vllm_turboquant.codec import FORMATS, page_layout, split_sizes
from vllm_turboquant.codec.formats import check_head_size, get_format

# Bytes per token per KV head (K + V) at head_dim 128, from the product spec (bf16: 512).
SPEC_D128 = {"turboquant_3.5": 114, "turboquant_3.5_mse": 112, "turboquant_3.5_kb": 112,
             "turboquant_2.5": 82, "turboquant_2.5_mse": 80}


def expected_bytes(name: str, d: int) -> int:
    """Independent count: codes + QJL signs + fp16 norms, K and V."""
    n_o, n_r = split_sizes(d)
    bits = {"turboquant_3.5": ((3, 2, True), (4, 3, False)),
            "turboquant_3.5_mse": ((4, 3, False), (4, 3, False)),
            "turboquant_3.5_kb": ((4, 4, False), (4, 2, False)),
            "turboquant_2.5": ((2, 1, True), (3, 2, False)),
            "turboquant_2.5_mse": ((3, 2, False), (3, 2, False))}[name]
    total = 0
    for bo, br, qjl in bits:
        total += (n_o * bo + n_r * br + (d if qjl else 0)) // 8 + 2 * (3 if qjl else 2)
    return total


def test_spec_table_at_head_dim_128():
    for name, size in SPEC_D128.items():
        assert FORMATS[name].bytes_per_token_head(128) == size


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [1, 3, 8])
def test_page_size_is_exact_and_regions_are_aligned(name, d, block_size, heads):
    lay = page_layout(name, d, block_size, heads)
    assert lay.slot_bytes == expected_bytes(name, d)
    assert lay.page_bytes == heads * block_size * expected_bytes(name, d)
    regions = sorted(lay.regions.values(), key=lambda r: r.offset)
    end = 0
    for r in regions:
        assert r.offset == end and r.offset % 16 == 0  # contiguous, no padding, 16-byte aligned
        end = r.offset + r.row_bytes * block_size
    assert end == lay.head_stride and lay.head_stride % 16 == 0


def test_3_5_is_at_least_4_4x_smaller_than_bf16_at_128():
    assert FORMATS["turboquant_3.5"].compression_vs_bf16(128) >= 4.4


@pytest.mark.parametrize("bad", [32, 80, 96, 112, 192, 512])
def test_unsupported_head_size_names_the_supported_ones(bad):
    with pytest.raises(ValueError, match=r"64, 128, 256"):
        check_head_size(bad)


def test_unknown_format_lists_ours():
    with pytest.raises(ValueError, match="turboquant_3.5_mse"):
        get_format("turboquant_3.6")


def test_block_size_must_keep_regions_aligned():
    with pytest.raises(ValueError, match="multiple of 16"):
        page_layout("turboquant_3.5", 128, 8, 1)


def test_our_3_5_bit_formats_take_at_most_0_9x_the_bytes_of_vllms_turboquant_4bit_nc():
    """The quality issue's byte budget, against vLLM's own preset as vLLM sizes it."""
    pytest.importorskip("vllm")
    from vllm_turboquant.eval import bytes_per_token_head

    for d in (64, 128, 256):
        upstream = bytes_per_token_head("turboquant_4bit_nc", d)
        assert upstream == d // 2 + 2 + d // 2 + 4  # 4-bit keys + norm, 4-bit values + scale, zero
        for name in ("turboquant_3.5", "turboquant_3.5_mse", "turboquant_3.5_kb"):
            assert bytes_per_token_head(name, d) <= 0.9 * upstream
