"""Launcher for the Triton cache write (tq_write.py); the oracle is `LayerKVCodec.write`."""
from __future__ import annotations

import torch
import triton

from vllm_turboquant.codec import LayerKVCodec, RecentTokens
from vllm_turboquant.codec.quantizer import TensorCodec

from . import next_pow2, tq_write
from .launch import VariantLauncher

BLOCK_T = 16
# At head_dim 256 the fp32 [256, 256] rotation and QJL tiles need 272 KB of shared memory (H100:
# 227 KB), so those layers use the codec's PyTorch write until the kernel tiles its K dimension.
MAX_HEAD_DIM = 128


class _TensorConstants:
    """Device copies of one tensor codec's tables. Refreshed in place (see `device_constants`)."""

    def __init__(self, tc: TensorCodec, perm: torch.Tensor, mean: torch.Tensor, device):
        self.n_r_pad = next_pow2(tc.n_r)
        for name, t in self._tables(tc, perm, mean, device).items():
            setattr(self, name, t)

    def refresh(self, tc: TensorCodec, perm: torch.Tensor, mean: torch.Tensor, device) -> None:
        for name, t in self._tables(tc, perm, mean, device).items():
            getattr(self, name).copy_(t)

    def _tables(self, tc: TensorCodec, perm, mean, device) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32, device=device)
        n_r_pad = self.n_r_pad
        r_r = torch.zeros(n_r_pad, n_r_pad, **f32)
        r_r[: tc.n_r, : tc.n_r] = tc.regular.rotation.to(**f32)
        out = dict(r_o=tc.outlier.rotation.to(**f32).contiguous(), r_r=r_r,
                   b_o=tc.outlier.boundaries.to(**f32), b_r=tc.regular.boundaries.to(**f32),
                   c_o=tc.outlier.centroids.to(**f32), c_r=tc.regular.centroids.to(**f32),
                   perm=perm.to(device=device, dtype=torch.int32).contiguous(),
                   mean=mean.to(**f32).contiguous())
        if tc.fmt.has_qjl:
            s = tc.qjl.to(**f32)
            out["s_o"] = s[:, : tc.n_o].contiguous()
            out["s_r"] = torch.zeros(tc.head_dim, n_r_pad, **f32)
            out["s_r"][:, : tc.n_r] = s[:, tc.n_o:]
        else:  # unused by the kernel
            out["s_o"] = out["s_r"] = torch.zeros(1, **f32)
        return out


def device_constants(codec: LayerKVCodec, device) -> tuple[_TensorConstants, _TensorConstants]:
    # Built once per codec and device, then rewritten in place when calibration bumps the codec's
    # version: CUDA graphs captured before calibration keep pointing at the same buffers.
    cache = codec.__dict__.setdefault("_write_constants", {})
    entry = cache.get(str(device))
    args = ((codec.key, codec.key_perm, codec.key_mean, device),
            (codec.value, codec.value_perm, codec.value_mean, device))
    if entry is None:
        entry = cache[str(device)] = [codec.version, tuple(_TensorConstants(*a) for a in args)]
    elif entry[0] != codec.version:
        for consts, a in zip(entry[1], args):
            consts.refresh(*a)
        entry[0] = codec.version
    return entry[1]


def write_kv(codec: LayerKVCodec, cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, recent: RecentTokens | None = None,
             entries: torch.Tensor | None = None) -> None:
    """Encode key/value [N, H, d] into slots [N] of cache [num_blocks, page_bytes] (slot -1 skipped),
    and stage exact copies of tokens with a ring entry >= 0 (entries [N]) in `recent`.
    No host synchronisation."""
    lay = codec.layout
    n = slots.shape[0]
    if n == 0:
        return
    if lay.head_dim > MAX_HEAD_DIM and cache.is_cuda:
        codec.write(cache, slots, key, value)
        if recent is not None:
            recent.write(codec, cache, slots, entries, key, value)
        return
    kconst, vconst = device_constants(codec, key.device)
    staged = recent is not None  # without it the staging pointers are never dereferenced
    k_stage, v_stage, tags = (recent.key, recent.value, recent.tag) if staged else (cache,) * 3
    k_write, v_write = _write_launchers(codec, kconst, vconst, staged)
    for write, c, x, stage in ((k_write, kconst, key, k_stage), (v_write, vconst, value, v_stage)):
        write((triton.cdiv(n, BLOCK_T), lay.num_kv_heads),
              x[:n].contiguous(), slots, cache, c.mean, c.perm, c.r_o, c.r_r, c.b_o, c.b_r,
              c.c_o, c.c_r, c.s_o, c.s_r, entries if staged else slots, stage, tags,
              n, lay.page_bytes, lay.head_stride)


def _write_launchers(codec: LayerKVCodec, kconst: _TensorConstants, vconst: _TensorConstants,
                     staged: bool) -> tuple[VariantLauncher, VariantLauncher]:
    """The K and V write launchers of a codec (built once: their constants are the layout's)."""
    cache = codec.__dict__.setdefault("_write_launchers", {})
    entry = cache.get((id(kconst), staged))  # one constants object per device
    if entry is None:
        lay = codec.layout
        off = {name: r.offset for name, r in lay.regions.items()}
        entry = cache[(id(kconst), staged)] = tuple(
            VariantLauncher(
                tq_write.tq_write_kernel,
                H=lay.num_kv_heads, D=lay.head_dim, N_O=tc.n_o, N_R=tc.n_r, N_R_PAD=c.n_r_pad,
                BS=lay.block_size, BLOCK_T=BLOCK_T, BO=tc.fmt.outlier_bits,
                BR=tc.fmt.regular_bits, HAS_QJL=tc.fmt.has_qjl,
                NORM_CORRECTION=tc.outlier.norm_correction,
                OFF_CO=off[f"{prefix}.codes_o"], OFF_CR=off[f"{prefix}.codes_r"],
                OFF_S=off.get(f"{prefix}.signs", 0), OFF_GO=off[f"{prefix}.gamma_o"],
                OFF_GR=off[f"{prefix}.gamma_r"], OFF_RN=off.get(f"{prefix}.rnorm", 0),
                HAS_STAGE=staged, IS_KEY=prefix == "k")
            for prefix, tc, c in (("k", codec.key, kconst), ("v", codec.value, vconst)))
    return entry
