"""The kernels' GPU path (PTX look-ups, tensor-core tiles) compiles for Hopper on a machine with
no GPU: the interpreter runs the plain-Triton path only, so this is what catches a broken inline
PTX block or a kernel that no longer fits its registers before it reaches a GPU."""
import pytest

pytest.importorskip("triton")

from vllm_turboquant.kernels.offline_compile import (compile_variant, decode_launches,  # noqa: E402
                                                     resources)


@pytest.mark.parametrize("name", ["turboquant_3.5_mse", "turboquant_3.5"])
def test_decode_variants_compile_for_sm90_within_their_registers(name, report):
    seen = decode_launches(name)  # Llama-3.1-8B heads, the newest 64 tokens exact
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
