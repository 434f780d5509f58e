"""GPU kernels (Triton). Imported as `vllm_turboquant.kernels`; each kernel's oracle is the codec."""
import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << (n - 1).bit_length()


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync (through pinned memory on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
