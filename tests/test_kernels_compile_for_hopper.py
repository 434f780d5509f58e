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


# A decode step's write (8 warps) and a prompt chunk's (4), MSE keys and QJL keys.
@pytest.mark.parametrize("name", ["turboquant_3.5_mse", "turboquant_3.5"])
@pytest.mark.parametrize("tokens", [48, 1024])
def test_cache_write_compiles_for_sm90_without_spills(name, tokens, report):
    import torch

    from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout
    from vllm_turboquant.kernels.cache_write import write_kv
    from vllm_turboquant.kernels.offline_compile import capture_launches

    codec = LayerKVCodec(page_layout(name, 128, 16, 8))
    codec.calibrate(torch.randn(16, 8, 128), torch.randn(16, 8, 128))
    kv = torch.randn(tokens, 8, 128, dtype=torch.bfloat16)
    slots = torch.arange(tokens)
    with capture_launches(USE_ASM=True) as seen:
        write_kv(codec, torch.zeros(tokens // 16 + 1, codec.layout.page_bytes, dtype=torch.uint8),
                 slots, kv, kv, RecentTokens(tokens, 64, 8, 128, "cpu"), slots.int())
    (kernel, args, constexprs), = seen
    r = resources(compile_variant(kernel, args, constexprs).asm["cubin"])
    report(f"sm_90 cache write, {name}, {tokens} tokens ({constexprs['num_warps']} warps): "
           f"{r['REG']} registers, {r['STACK']} B stack")
    # Measured (H100): with the rotation matrix in registers (tf32x3) this build sat at 255
    # registers with 400 B of stack at 4 warps and took 779 us for 16,384 tokens; streamed through
    # shared memory, 128 registers, no stack, 513 us. QJL keys' S projection likewise: 255
    # registers and 472 B of stack (turboquant_3.5, 1,024 tokens) before it streamed Sᵀ.
    assert r["STACK"] == 0 and r["REG"] < 255
