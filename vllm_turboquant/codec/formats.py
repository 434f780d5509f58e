"""The kv_cache_dtype strings this package adds, and what each stores per token and KV head.

Every vector of head_dim d is split into n_o = d/4 "outlier" channels and n_r = 3d/4 regular
channels; each group is rotated, quantized and normed on its own (the paper's KV-cache setup).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SUPPORTED_HEAD_SIZES = (64, 128, 256)
NORM_BYTES = 2  # every norm is stored as fp16


@dataclass(frozen=True)
class TensorFormat:
    """How one of K or V is stored.

    kind "mse": TurboQuant_mse, `outlier_bits`/`regular_bits` per coordinate, norms gamma_o, gamma_r.
    kind "prod": TurboQuant_prod, i.e. the same MSE stage at `outlier_bits`/`regular_bits`, then one
    QJL sign bit per coordinate of the residual and the residual norm ||r||.
    """

    kind: Literal["mse", "prod"]
    outlier_bits: int
    regular_bits: int

    @property
    def has_qjl(self) -> bool:
        return self.kind == "prod"

    @property
    def num_norms(self) -> int:
        return 3 if self.has_qjl else 2

    def bytes_per_vector(self, head_dim: int) -> int:
        n_o, n_r = split_sizes(head_dim)
        bits = n_o * self.outlier_bits + n_r * self.regular_bits + (head_dim if self.has_qjl else 0)
        return bits // 8 + self.num_norms * NORM_BYTES


@dataclass(frozen=True)
class KVFormat:
    name: str
    key: TensorFormat
    value: TensorFormat
    description: str

    def bytes_per_token_head(self, head_dim: int) -> int:
        """Bytes one token occupies for one KV head (K and V together)."""
        check_head_size(head_dim)
        return self.key.bytes_per_vector(head_dim) + self.value.bytes_per_vector(head_dim)

    def compression_vs_bf16(self, head_dim: int) -> float:
        return 2 * 2 * head_dim / self.bytes_per_token_head(head_dim)


FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        KVFormat(
            "turboquant_3.5",
            key=TensorFormat("prod", 3, 2),
            value=TensorFormat("mse", 4, 3),
            description="keys TurboQuant_prod (3/2-bit MSE + QJL signs), values TurboQuant_mse 4/3-bit",
        ),
        KVFormat(
            "turboquant_3.5_mse",
            key=TensorFormat("mse", 4, 3),
            value=TensorFormat("mse", 4, 3),
            description="keys and values TurboQuant_mse 4/3-bit",
        ),
        KVFormat(
            "turboquant_3.5_kb",
            key=TensorFormat("mse", 4, 4),
            value=TensorFormat("mse", 4, 2),
            description="key-biased 3.5: keys TurboQuant_mse 4/4-bit, values 4/2-bit (the bytes "
                        "of turboquant_3.5_mse; keys cause most of the loss)",
        ),
        KVFormat(
            "turboquant_2.5",
            key=TensorFormat("prod", 2, 1),
            value=TensorFormat("mse", 3, 2),
            description="keys TurboQuant_prod (2/1-bit MSE + QJL signs), values TurboQuant_mse 3/2-bit",
        ),
        KVFormat(
            "turboquant_2.5_mse",
            key=TensorFormat("mse", 3, 2),
            value=TensorFormat("mse", 3, 2),
            description="keys and values TurboQuant_mse 3/2-bit",
        ),
    )
}


def split_sizes(head_dim: int) -> tuple[int, int]:
    """(n_outlier, n_regular) channels for a head size."""
    check_head_size(head_dim)
    return head_dim // 4, head_dim - head_dim // 4


def check_head_size(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"TurboQuant supports head_dim in {SUPPORTED_HEAD_SIZES}, got {head_dim}. "
            "Use kv_cache_dtype='auto' or 'fp8' for this model."
        )


def is_turboquant_dtype(name: object) -> bool:
    return isinstance(name, str) and name in FORMATS


def get_format(name: str) -> KVFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"Unknown TurboQuant kv_cache_dtype {name!r}; supported: {', '.join(FORMATS)}"
        ) from None
