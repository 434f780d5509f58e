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
    mains = [(k, a, c) for k, a, c in seen
             if k.fn.__name__ == "tq_attention_kernel" and not c["TAIL"]]
    assert len(mains) == 1 and mains[0][2]["SWAP"]
    r = resources(compile_variant(*mains[0]).asm["cubin"])
    report(f"sm_90 decode kernel {name}: {r['REG']} registers, {r['STACK']} B stack")
    # The hot loop as measured (H100: 168 registers, a few bytes of stack). At the 255 cap it
    # spilled and ran slower (16 x 32k decode 540 vs 472 us, docs/kernel_decode.md).
    assert r["REG"] < 255 and r["STACK"] <= 64
