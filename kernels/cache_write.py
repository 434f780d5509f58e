"""Launcher for the Triton cache write (tq_write.py); the oracle is `LayerKVCodec.write`."""
from __future__ import annotations

import torch
import triton

from vllm_turboquant.codec import LayerKVCodec, RecentTokens
from vllm_turboquant.codec.quantizer import TensorCodec

from . import next_pow2, tq_write
from .launch import VariantLauncher, shared_memory_limit

BLOCK_T = 16
# Warps per program: 8 for decode-sized writes, 4 for prompt chunks (H100, one K+V launch under
# a CUDA graph, 3.5_mse, a1d7621: 48 tokens 14.9 us with 8 warps vs 15.2 with 4; 16,384 tokens
# 511 us with 4 vs 690 with 8). Larger token tiles for chunks were slower (32 or 64 tokens:
# 592-1066 us), so every write keeps BLOCK_T tokens per program (docs/e2e_decode.md).
WRITE_WARPS, CHUNK_WRITE_WARPS, CHUNK_TOKENS = 8, 4, 512
# Rows of Rᵀ (and Sᵀ's columns) per step of the rotation (and QJL) dots, tq_write._rotate_group,
# and pipeline stages. Two stages, not Triton's three: the streamed tiles' shared memory (66 KB,
# 102 KB with QJL keys) capped an SM at 3 (2) programs. H100, 16,384 tokens, 4 warps: 3.5_mse
# 510 -> 444 us, 3.5 868 -> 711; 48 tokens, 8 warps, 64 rows a step: 14.8 -> 14.0, 22.3 -> 20.0.
WRITE_STAGES, ROTATE_BK, CHUNK_ROTATE_BK = 2, 64, 32
# 64 rows a step need 102 KB of shared memory with QJL keys (sm_89 build); GPUs with less per
# program than this (Ada, consumer Blackwell: 99 KB) take 32 rows for every write.
WIDE_ROTATE_MIN_SHARED = 128 << 10
# head_dim 256 layers use the codec's PyTorch write. With the matrices streamed, the kernel now
# fits there too (sm_90 offline: 67-205 KB of shared memory of 227, no spills but 40 B at 4
# warps with QJL keys), but it has not run on a GPU at that size yet.
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

    def tables(self) -> tuple[torch.Tensor, ...]:
        """In the kernel's argument order (PERM ... S_R)."""
        return (self.perm, self.rt_o, self.rt_r, self.m_o, self.m_r, self.b_o, self.b_r,
                self.c_o, self.c_r, self.s_o, self.s_r)

    def _tables(self, tc: TensorCodec, perm, mean, device) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32)  # built on the host, moved once below
        n_o, n_r, n_r_pad = tc.n_o, tc.n_r, self.n_r_pad
        r_o = tc.outlier.rotation.cpu().double()
        r_r = torch.zeros(n_r_pad, n_r_pad, dtype=torch.float64)
        r_r[:n_r, :n_r] = tc.regular.rotation.cpu().double()
        # Per head, the group's mean in split order, rotated: R(x - mu) = Rx - R·mu, so the kernel
        # rotates the model's 16-bit x exactly (below) and subtracts this.
        mu = torch.gather(mean.double().cpu(), 1, perm.cpu().long())         # [H, d] split order
        mu_r = torch.zeros(mu.shape[0], n_r_pad, dtype=torch.float64)
        mu_r[:, :n_r] = mu[:, n_o:]
        out = dict(rt_o=_tf32_pair(r_o.T), rt_r=_tf32_pair(r_r.T),
                   m_o=(mu[:, :n_o] @ r_o.T).to(**f32), m_r=(mu_r @ r_r.T).to(**f32),
                   b_o=tc.outlier.boundaries.to(**f32), b_r=tc.regular.boundaries.to(**f32),
                   c_o=tc.outlier.centroids.to(**f32), c_r=tc.regular.centroids.to(**f32),
                   perm=perm.to(torch.int32))
        if tc.fmt.has_qjl:
            # Sᵀ's rows of each group (zero rows in the padding), as TF32 pairs [2, n, d].
            s = tc.qjl.cpu().double()
            s_r = torch.zeros(n_r_pad, tc.head_dim, dtype=torch.float64)
            s_r[:n_r] = s[:, n_o:].T
            out["s_o"] = _tf32_pair(s[:, :n_o].T)
            out["s_r"] = _tf32_pair(s_r)
        else:  # unused by the kernel
            out["s_o"] = out["s_r"] = torch.zeros(1, **f32)
        return {k: v.to(device).contiguous() for k, v in out.items()}


def _tf32_pair(m: torch.Tensor) -> torch.Tensor:
    """[2, *m.shape] fp32: m's TF32 part (low 13 mantissa bits zero) and the TF32 rounding of the
    rest. A 16-bit x (bf16, fp16) is exact in TF32, so x·hi + x·lo in two TF32 tensor-core dots is
    m·x to ~2^-21 relative: fp32-accurate in two dots, where tf32x3 takes three and splits both
    operands in the kernel, the matrix again for every 16 tokens."""
    m32 = m.float().contiguous()
    hi = (m32.view(torch.int32) & ~0x1FFF).view(torch.float32)
    lo = (m.double() - hi.double()).float()
    lo = (lo.view(torch.int32) + 0x1000 & ~0x1FFF).view(torch.float32)  # round to nearest
    return torch.stack([hi, lo]).contiguous()


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
    key, value = _rows(key[:n]), _rows(value[:n])
    chunk = n > CHUNK_TOKENS
    bk = CHUNK_ROTATE_BK if chunk or shared_memory_limit(cache.device) < WIDE_ROTATE_MIN_SHARED \
        else ROTATE_BK
    _write_launcher(codec, kconst, staged, chunk, bk, key.dtype == torch.float32)(
        (triton.cdiv(n, BLOCK_T), lay.num_kv_heads, 2),
        key, value, slots, cache, *kconst.tables(), *vconst.tables(),
        entries if staged else slots, k_stage, v_stage, tags, n, key.stride(0), value.stride(0),
        lay.page_bytes, lay.head_stride)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, H, d] with contiguous heads; tokens may be strided (vLLM's K and V are views into
    the fused QKV projection: reading them in place saves two copies per layer and step)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _write_launcher(codec: LayerKVCodec, kconst: _TensorConstants, staged: bool,
                    chunk: bool, bk: int, x_split: bool) -> VariantLauncher:
    """The codec's K+V write launcher (built once: its constants are the layout's) for decode-
    sized writes or prompt chunks (`chunk`), bk rows of the matrices per step."""
    cache = codec.__dict__.setdefault("_write_launchers", {})
    key = (id(kconst), staged, chunk, bk, x_split)  # one constants object per device
    launcher = cache.get(key)
    if launcher is None:
        lay = codec.layout
        off = {name: r.offset for name, r in lay.regions.items()}
        per_tensor = {}
        for prefix, tc in (("k", codec.key), ("v", codec.value)):
            p = prefix.upper()
            per_tensor.update({
                f"{p}_BO": tc.fmt.outlier_bits, f"{p}_BR": tc.fmt.regular_bits,
                f"{p}_QJL": tc.fmt.has_qjl, f"{p}_NC": tc.outlier.norm_correction,
                f"{p}_OFF_CO": off[f"{prefix}.codes_o"], f"{p}_OFF_CR": off[f"{prefix}.codes_r"],
                f"{p}_OFF_S": off.get(f"{prefix}.signs", 0),
                f"{p}_OFF_GO": off[f"{prefix}.gamma_o"], f"{p}_OFF_GR": off[f"{prefix}.gamma_r"],
                f"{p}_OFF_RN": off.get(f"{prefix}.rnorm", 0)})
        launcher = cache[key] = VariantLauncher(
            tq_write.tq_write_kernel, H=lay.num_kv_heads, D=lay.head_dim, N_O=codec.key.n_o,
            N_R=codec.key.n_r, N_R_PAD=kconst.n_r_pad, BS=lay.block_size, BLOCK_T=BLOCK_T,
            HAS_STAGE=staged, BK=bk, X_SPLIT=x_split,
            num_warps=CHUNK_WRITE_WARPS if chunk else WRITE_WARPS, num_stages=WRITE_STAGES,
            **per_tensor)
    return launcher
