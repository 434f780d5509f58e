"""The pure-PyTorch references the kernels are tested against (they live in the codec)."""
from vllm_turboquant.codec import context_kv  # noqa: F401  (oracle of dense_context.dequantize_context)
from vllm_turboquant.codec import paged_attention  # noqa: F401  (oracle of paged_attention.varlen_attention)
