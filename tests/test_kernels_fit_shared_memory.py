"""Every kernel variant an engine compiles fits the shared memory of the GPUs we claim (Hopper,
A100, Ada / consumer Blackwell at 99 KB per program), after `launch` drops pipeline stages where
it must; what can never fit fails with an error that names the way out."""
import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from vllm_turboquant.codec import LayerKVCodec, RecentTokens, page_layout  # noqa: E402
from vllm_turboquant.kernels import cache_write, dense_context, launch as launch_mod  # noqa: E402
from vllm_turboquant.kernels.offline_compile import capture_launches, compile_variant  # noqa: E402
from vllm_turboquant.kernels.paged_attention import _run_variants  # noqa: E402

SHARED = {80: 166912, 89: 101376}  # bytes per program: A100, Ada (RTX 40xx, L4, L40S; also sm_120)


class _Kernel:
    """Stands in for a Triton kernel that needs more shared memory than the GPU has with more
    than `fits_at` pipeline stages."""

    def __init__(self, fits_at: int, resource: str = "shared memory"):
        self.fits_at, self.resource, self.calls = fits_at, resource, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            stages = kwargs.get("num_stages", 3)
            self.calls.append(stages)
            if stages > self.fits_at:
                raise OutOfResources(150_000, 101_376, self.resource)
            return ("ran", stages)
        return run


def test_a_variant_too_large_for_this_gpu_runs_with_fewer_stages_and_remembers_them():
    k = _Kernel(fits_at=1)
    assert launch_mod.launch(k, (1,), 0, BLOCK=64) == ("ran", 1)
    assert k.calls == [3, 2, 1]
    assert launch_mod.launch(k, (1,), 0, BLOCK=64) == ("ran", 1)
    assert k.calls == [3, 2, 1, 1]  # straight to the stage count that fits
    assert launch_mod.launch(k, (1,), 0, BLOCK=128, num_stages=2) == ("ran", 1)


def test_a_variant_that_never_fits_says_what_to_use_instead():
    with pytest.raises(launch_mod.SharedMemoryError, match="auto or fp8"):
        launch_mod.launch(_Kernel(fits_at=0), (1,), 0, BLOCK=64)


def test_other_resource_limits_are_not_mistaken_for_shared_memory():
    with pytest.raises(OutOfResources):
        launch_mod.launch(_Kernel(fits_at=0, resource="threads"), (1,), 0)


def _engine_variants(name: str, d: int, hq: int, hkv: int, monkeypatch) -> list[tuple]:
    """(kernel, args, constexprs) of every variant warm-up compiles for one layer shape."""
    codec = LayerKVCodec(page_layout(name, d, 16, hkv))
    codec.calibrate(torch.randn(16, hkv, d), torch.randn(16, hkv, d))
    direct = []
    monkeypatch.setattr(dense_context, "launch",
                        lambda kernel, grid, *a, **kw: direct.append((kernel, a, kw)))
    with capture_launches() as seen:
        _run_variants(codec, hq, torch.device("cpu"), None, RecentTokens(4, 64, hkv, d, "cpu"),
                      torch.bfloat16)
    variants = seen + direct
    if d > cache_write.MAX_HEAD_DIM:  # such layers write through the codec on a GPU
        variants = [v for v in variants if v[0].fn.__name__ != "tq_write_kernel"]
    return [(k, a, dict(c, USE_ASM=True)) for k, a, c in variants]


def _fitted_shared(kernel, args, constexprs, arch: int) -> tuple[int, int]:
    """(stages, shared bytes) of the variant as `launch` would run it on a GPU of `arch`."""
    stages = constexprs.get("num_stages") or launch_mod.TRITON_DEFAULT_STAGES
    while True:
        used = compile_variant(kernel, args, dict(constexprs, num_stages=stages), arch)
        if used.metadata.shared <= SHARED[arch] or stages == 1:
            return stages, used.metadata.shared
        stages -= 1


# On 99 KB GPUs head_dim 256 fits with MSE keys only: QJL keys' attention variant needs 115 KB
# even unpipelined, so turboquant_3.5 / 2.5 stop there with SharedMemoryError at warm-up.
@pytest.mark.parametrize("name,arch,d,hq,hkv", [
    (n, arch, d, hq, hkv) for n in ("turboquant_3.5_mse", "turboquant_3.5")
    for arch, d, hq, hkv in ((89, 64, 9, 3), (89, 128, 32, 8), (80, 256, 4, 1))
] + [("turboquant_3.5_mse", 89, 256, 4, 1)])
def test_every_variant_fits_the_gpus_shared_memory(name, arch, d, hq, hkv, monkeypatch, report):
    # The write and the dense read size themselves by the device's limit: pretend to be that GPU.
    monkeypatch.setattr(cache_write, "shared_memory_limit", lambda device: SHARED[arch])
    monkeypatch.setattr(dense_context, "shared_memory_limit", lambda device: SHARED[arch])
    for kernel, args, constexprs in _engine_variants(name, d, hq, hkv, monkeypatch):
        stages, used = _fitted_shared(kernel, args, constexprs, arch)
        report(f"sm_{arch} {name} head_dim {d} {kernel.fn.__name__}: {used} B shared memory "
               f"at {stages} stages (limit {SHARED[arch]})")
        assert used <= SHARED[arch], kernel.fn.__name__
