"""The Triton decode kernel against the codec's paged attention (the oracle).

On CPU these run under Triton's interpreter (TRITON_INTERPRET=1, tiny shapes), launched by
tests/test_kernels_interpreted.py; on a GPU machine run `pytest tests/kernels` directly."""
import pytest
import torch

pytest.importorskip("triton")

from vllm_turboquant.codec import FORMATS, LayerKVCodec, page_layout, paged_attention  # noqa: E402
from vllm_turboquant.kernels.decode_attention import decode_attention  # noqa: E402

from ..test_packed_attention import build_cache  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("d,kv_heads,gqa", [(64, 2, 3), (128, 1, 4), (256, 1, 1)])
def test_decode_kernel_matches_the_codec(device, name, d, kv_heads, gqa, gen):
    codec = LayerKVCodec(page_layout(name, d, 16, kv_heads))
    calib_k = torch.randn(32, kv_heads, d, generator=gen) * 2 + 0.3
    codec.calibrate(calib_k, torch.randn(32, kv_heads, d, generator=gen))
    seq_lens = [1, 16, 37]
    cache, table, _ = build_cache(codec, seq_lens, gen, num_blocks=12)
    query = torch.randn(len(seq_lens), kv_heads * gqa, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(codec, query, cache, table, lens,
                           torch.arange(len(seq_lens) + 1), d ** -0.5)
    for splits in (1, 2):
        got = decode_attention(codec, query.to(device), cache.to(device), table.to(device),
                               lens.to(device), d ** -0.5, num_splits=splits).cpu()
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-2, (splits, err)
