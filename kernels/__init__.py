"""GPU kernels (Triton). Imported as `vllm_turboquant.kernels`; each kernel's oracle is the codec."""


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << (n - 1).bit_length()
