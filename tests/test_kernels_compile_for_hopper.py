"""The kernels' GPU path (PTX look-ups, tensor-core tiles) compiles for Hopper on a machine with
no GPU: the interpreter runs the plain-Triton path only, so this is what catches a broken inline
PTX block or a kernel that no longer fits its registers before it reaches a GPU."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout  # noqa: E402
from vllm_turboquant.kernels.offline_compile import (capture_launches, compile_variant,  # noqa: E402
                                                     resources)
from vllm_turboquant.kernels.paged_attention import decode_attention  # noqa: E402


@pytest.mark.parametrize("name", ["turboquant_3.5_mse", "turboquant_3.5"])
def test_decode_variants_compile_for_sm90_within_their_registers(name, report):
    d, kv_heads, block_size = 128, 8, 16
    codec = LayerKVCodec(page_layout(name, d, block_size, kv_heads))
    codec.calibrate(torch.randn(16, kv_heads, d), torch.randn(16, kv_heads, d))
    cache = torch.zeros(4, codec.layout.page_bytes, dtype=torch.uint8)
    recent = RecentTokens(1, 64, kv_heads, d, "cpu")
    with capture_launches(USE_ASM=True) as seen:
        try:
            decode_attention(codec, torch.randn(1, 4 * kv_heads, d), cache,
                             torch.arange(4, dtype=torch.int32).view(1, 4),
                             torch.tensor([64], dtype=torch.int32), d ** -0.5, recent=recent)
        except Exception:  # noqa: BLE001 - the merge reads outputs no launch wrote
            pass
    variants = {("tail" if c["TAIL"] else "main"): (k, a, c) for k, a, c in seen
                if k.fn.__name__ == "tq_attention_kernel"}
    assert variants["main"][2]["SWAP"]
    used = {}
    for which, variant in variants.items():
        r = used[which] = resources(compile_variant(*variant).asm["cubin"])
        report(f"sm_90 decode kernel {name}, {which} launch: {r['REG']} registers, "
               f"{r['STACK']} B stack")
    # As measured (H100): the main loop at 168 registers (its cap: 12 programs per SM) with a few
    # bytes of stack; the exact copies' launch at 128 (it spilled at 255 with one warp). Spills
    # beyond that cost time: 255 registers ran 16 x 32k decode in 540 vs 472 us.
    assert used["main"]["REG"] <= 168 and used["main"]["STACK"] <= 64
    assert used["tail"]["REG"] < 255 and used["tail"]["STACK"] <= 64
