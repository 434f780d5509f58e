"""GPU kernels (Triton). Imported as `vllm_turboquant.kernels`; each kernel's oracle is the codec."""
