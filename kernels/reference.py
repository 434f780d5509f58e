"""The pure-PyTorch references the kernels are tested against (they live in the codec):
paged_attention for paged_attention.varlen_attention, context_kv for
dense_context.dequantize_context."""
from vllm_turboquant.codec import context_kv, paged_attention  # noqa: F401
