"""Engine start-up compiles, in parallel, every kernel variant a step then uses (kernels/launch.py).

Under Triton's interpreter (CPU) nothing compiles: warm-up and the steps still run every variant.
The layer shape (5 query heads over 1 KV head, head_dim 64, blocks of 32) is one no other test
uses, so on a GPU its variants are not compiled yet."""
import pytest
import torch

pytest.importorskip("triton")

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout  # noqa: E402

from ..test_packed_attention import build_cache  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HQ, HKV, D, BS = 5, 1, 64, 32


def _compiled_variants() -> int:
    from vllm_turboquant.kernels import tq_attention, tq_dequant, tq_merge, tq_write

    kernels = (tq_attention.tq_attention_kernel, tq_merge.tq_merge_kernel,
               tq_dequant.tq_dequant_kernel, tq_write.tq_write_kernel)
    return sum(len(cache[0]) for k in kernels  # the interpreter keeps no compiled variants
               for cache in getattr(k, "device_caches", {}).values())


def _codec(gen) -> LayerKVCodec:
    codec = LayerKVCodec(page_layout("turboquant_3.5", D, BS, HKV))
    codec.calibrate(torch.randn(32, HKV, D, generator=gen), torch.randn(32, HKV, D, generator=gen))
    return codec


def test_steps_after_warm_up_compile_nothing(gen):
    from vllm_turboquant.kernels.cache_write import write_kv
    from vllm_turboquant.kernels.dense_context import context_span, dequantize_context
    from vllm_turboquant.kernels.paged_attention import varlen_attention, warm_up

    codec, dev = _codec(gen), DEVICE
    recent = RecentTokens(rows=4, window=16, num_kv_heads=HKV, head_dim=D, device=dev)
    before = _compiled_variants()
    warm_up(codec, HQ, dev, None, recent, torch.bfloat16)
    warmed = _compiled_variants()
    assert warmed > before or not ON_GPU, "warm-up compiled nothing for a new layer shape"

    seq_lens = [70, 33, 5]
    cache, table, _ = build_cache(codec, seq_lens, gen, num_blocks=8)
    cache, table = cache.to(dev), table.to(dev)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    bf16 = dict(dtype=torch.bfloat16, device=dev)
    # decode; a mixed step over the context only (a 4-token chunk, two decodes); a dense read
    decode_qsl = torch.arange(4, dtype=torch.int32, device=dev)
    varlen_attention(codec, torch.randn(3, HQ, D, **bf16), cache, table, lens, decode_qsl, 0.1, 1,
                     recent=recent)
    mixed_qsl = torch.tensor([0, 4, 5, 6], dtype=torch.int32, device=dev)
    varlen_attention(codec, torch.randn(6, HQ, D, **bf16), cache, table, lens, mixed_qsl, 0.1, 4,
                     recent=recent, context_only=True, return_lse=True)
    span = context_span(torch.tensor([0, 0, 0]), torch.tensor(seq_lens), dev)
    dequantize_context(codec, cache, table, lens, span, HQ, torch.bfloat16, recent)
    # a write of three new tokens (vLLM's slots are int64), one staged
    new = torch.randn(3, HKV, D, **bf16)
    write_kv(codec, cache, torch.tensor([70, 71, -1], device=dev), new, new, recent,
             torch.tensor([5, -1, -1], dtype=torch.int32, device=dev))
    # and a prompt chunk's write (its own warp count), nothing stored
    chunk = torch.randn(600, HKV, D, **bf16)
    skip = torch.full((600,), -1, device=dev)
    write_kv(codec, cache, skip, chunk, chunk, recent, skip.int())
    assert _compiled_variants() == warmed, "a step after warm-up compiled a new variant"


def test_launches_inside_compiling_only_only_compile(gen):
    from vllm_turboquant.kernels.cache_write import write_kv
    from vllm_turboquant.kernels.launch import compiling_only

    codec, dev = _codec(gen), DEVICE
    pages = torch.zeros(2, codec.layout.page_bytes, dtype=torch.uint8, device=dev)
    kv = torch.randn(3, HKV, D, dtype=torch.float16, device=dev)  # a dtype warm-up never used
    slots = torch.tensor([0, 1, 40], device=dev)
    with compiling_only():
        write_kv(codec, pages, slots, kv, kv)
    # On a GPU the block only compiled; under the interpreter (nothing to compile) it ran.
    assert bool(pages.any()) == (not ON_GPU), "compiling_only() ran a launch on the GPU"
    write_kv(codec, pages, slots, kv, kv)
    assert pages.any()
