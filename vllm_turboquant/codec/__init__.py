"""Pure-PyTorch TurboQuant codec (no vLLM import): formats, codebooks, byte layout, attention.

This is the reference every GPU kernel is tested against.
"""
from .attention import attend_packed, context_kv, dense_attention, paged_attention
from .codebook import codebook_mse, lloyd_max_centroids
from .formats import (FORMATS, SUPPORTED_HEAD_SIZES, KVFormat, TensorFormat, check_head_size,
                      get_format, is_turboquant_dtype, split_sizes)
from .kv_codec import LayerKVCodec
from .layout import PageLayout, page_layout
from .outliers import default_split, split_from_energy, split_from_vectors
from .recent import RecentTokens
from .quantizer import GroupQuantizer, QuantizedVectors, TensorCodec, tensor_codec
from .rotation import qjl_constant, qjl_matrix, random_rotation

__all__ = [
    "FORMATS", "SUPPORTED_HEAD_SIZES", "KVFormat", "TensorFormat", "check_head_size", "get_format",
    "is_turboquant_dtype", "split_sizes", "codebook_mse", "lloyd_max_centroids", "LayerKVCodec",
    "PageLayout", "page_layout", "default_split", "split_from_energy", "split_from_vectors",
    "GroupQuantizer", "QuantizedVectors", "TensorCodec", "tensor_codec", "qjl_constant",
    "qjl_matrix", "random_rotation", "RecentTokens", "attend_packed", "context_kv",
    "dense_attention", "paged_attention",
]
