"""One layer's KV cache codec: encode K/V into paged bytes, read them back, decode.

`LayerKVCodec` owns the per-(layer, KV head) state fixed at calibration: the channel splits (see
outliers.py) and the per-head means removed before quantizing. Removing the key mean μ is free
for attention (softmax is invariant to the per-query constant q·μ, so scores use centred keys
directly), and done in the heads where it does not lengthen the attention sink's key
(`_centre_keys`);
the value mean is added back once to the attention output (Σ p = 1). Neither costs page bytes.

The cache it works on is the layer's raw uint8 buffer viewed as [num_blocks, page_bytes]; slots are vLLM's flat slot
indices (block · block_size + offset), and slot -1 (padding) is skipped.
"""
from __future__ import annotations

import torch

from .formats import check_head_size
from .layout import PageLayout
from .outliers import default_split, split_from_energy
from .packing import pack_bitplanes, pack_signs, unpack_bitplanes, unpack_signs
from .quantizer import QuantizedVectors, TensorCodec, tensor_codec
from .rotation import DEFAULT_SEED


def _norm_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _bytes_norm(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


class LayerKVCodec:
    def __init__(self, layout: PageLayout, seed: int = DEFAULT_SEED, norm_correction: bool = True,
                 center_keys: bool = True, center_values: bool = False,
                 qjl_decode: str = "min_mse"):
        check_head_size(layout.head_dim)
        self.layout = layout
        self.key = tensor_codec(layout.format.key, layout.head_dim, seed, "k", norm_correction,
                                qjl_decode)
        self.value = tensor_codec(layout.format.value, layout.head_dim, seed, "v", norm_correction,
                                  qjl_decode)
        h, d = layout.num_kv_heads, layout.head_dim
        self.key_perm = default_split(d, h)
        self.value_perm = default_split(d, h)
        self.key_mean = torch.zeros(h, d)
        self.value_mean = torch.zeros(h, d)
        self.center_keys, self.center_values = center_keys, center_values
        self.calibrated = False
        self.version = 0  # bumped whenever splits or means change (kernels refresh their copies)

    # --- channel splits -----------------------------------------------------------------------
    def calibrate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Fix the outlier channels and means from observed post-RoPE keys/values [N, H, d]. Once
        only; the same as observe() then finish_calibration()."""
        if self.calibrated:
            return
        self.observe(key, value)
        self.finish_calibration()

    def observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Accumulate calibration statistics over several writes (e.g. the chunks of one prompt):
        per-channel sums and sums of squares, in float64 so the centred energy Σx² − Nμ² stays
        exact enough to rank channels. Nothing changes until finish_calibration()."""
        if self.calibrated or key.shape[0] == 0:
            return
        stats = self.__dict__.setdefault("_observed", {})
        stats.setdefault("k.first", key[0].double())  # a prompt's first token: the attention sink
        for name, x in (("k", key), ("v", value)):
            x = x.double()
            for part, t in ((f"{name}.sum", x.sum(0)), (f"{name}.sq", x.pow(2).sum(0))):
                stats[part] = stats[part] + t if part in stats else t
        stats["n"] = stats.get("n", 0) + key.shape[0]

    @property
    def observed_tokens(self) -> int:
        return self.__dict__.get("_observed", {}).get("n", 0)

    def finish_calibration(self) -> None:
        """Fix splits and means from what observe() saw (nothing seen: stays uncalibrated)."""
        stats = self.__dict__.pop("_observed", None)
        if self.calibrated or not stats:
            return
        n = stats["n"]

        def mean_and_perm(name: str, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = stats[f"{name}.sum"] / n * center.unsqueeze(-1)  # heads not centred: μ = 0
            energy = stats[f"{name}.sq"] - n * mean.pow(2)  # centred where μ ≠ 0, raw elsewhere
            return mean.float(), split_from_energy(energy.clamp_min(0)).to(mean.device)

        heads = stats["k.sum"].shape[0]
        device = stats["k.sum"].device
        self.key_mean, self.key_perm = mean_and_perm("k", self._centre_keys(stats))
        self.value_mean, self.value_perm = mean_and_perm(
            "v", torch.full((heads,), self.center_values, dtype=torch.bool, device=device))
        self.calibrated = True
        self.version += 1

    def _centre_keys(self, stats: dict) -> torch.Tensor:
        """Per KV head: remove the key mean only where that does not lengthen the sink's key.
        A prompt's first token draws much of every later query's attention, so its key's error
        counts most, and the error grows with the stored vector's length. Where the sink's key is
        aligned with the mean (Gemma-3: cos 0.54-0.96), centring shrinks it and helps (KL 0.048
        → 0.021); where it points away from the mean (SmolLM2's layers 12-29: |k0 - μ| = 2.4-5.5
        |k0|), centring multiplies its error and hurts (README, "Key mean")."""
        heads = stats["k.sum"].shape[0]
        if not self.center_keys:
            return torch.zeros(heads, dtype=torch.bool, device=stats["k.sum"].device)
        first, mean = stats["k.first"], stats["k.sum"] / stats["n"]
        return (first - mean).norm(dim=-1) <= first.norm(dim=-1)

    def set_splits(self, key_perm: torch.Tensor, value_perm: torch.Tensor) -> None:
        self.key_perm, self.value_perm, self.calibrated = key_perm, value_perm, True
        self.version += 1

    # --- fields <-> bytes ----------------------------------------------------------------------
    @staticmethod
    def _pack(prefix: str, c: TensorCodec, q: QuantizedVectors) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.codes_o": pack_bitplanes(q.codes_o, c.fmt.outlier_bits),
               f"{prefix}.codes_r": pack_bitplanes(q.codes_r, c.fmt.regular_bits),
               f"{prefix}.gamma_o": _norm_bytes(q.gamma_o),
               f"{prefix}.gamma_r": _norm_bytes(q.gamma_r)}
        if c.fmt.has_qjl:
            out[f"{prefix}.signs"] = pack_signs(q.signs)
            out[f"{prefix}.rnorm"] = _norm_bytes(q.rnorm)
        return out

    @staticmethod
    def _unpack(prefix: str, c: TensorCodec, rows: dict[str, torch.Tensor]) -> QuantizedVectors:
        q = QuantizedVectors(
            codes_o=unpack_bitplanes(rows[f"{prefix}.codes_o"], c.fmt.outlier_bits, c.n_o),
            codes_r=unpack_bitplanes(rows[f"{prefix}.codes_r"], c.fmt.regular_bits, c.n_r),
            gamma_o=_bytes_norm(rows[f"{prefix}.gamma_o"]),
            gamma_r=_bytes_norm(rows[f"{prefix}.gamma_r"]))
        if c.fmt.has_qjl:
            q.signs = unpack_signs(rows[f"{prefix}.signs"], c.head_dim) > 0
            q.rnorm = _bytes_norm(rows[f"{prefix}.rnorm"])
        return q

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """key, value [N, H, d] → {region name: uint8 [N, H, row_bytes]}."""
        key = key.float() - self.key_mean.to(key.device)
        value = value.float() - self.value_mean.to(value.device)
        rows = self._pack("k", self.key, self.key.quantize(key, self.key_perm))
        rows.update(self._pack("v", self.value, self.value.quantize(value, self.value_perm)))
        return rows

    def unpack(self, rows: dict[str, torch.Tensor]) -> tuple[QuantizedVectors, QuantizedVectors]:
        return self._unpack("k", self.key, rows), self._unpack("v", self.value, rows)

    def decode(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """{region: uint8 [N, H, row]} → key, value [N, H, d] float32 (original channel order)."""
        qk, qv = self.unpack(rows)
        key = self.key.dequantize(qk, self.key_perm) + self.key_mean.to(qk.codes_o.device)
        value = self.value.dequantize(qv, self.value_perm) + self.value_mean.to(qv.codes_o.device)
        return key, value

    # --- pages ----------------------------------------------------------------------------------
    def write(self, cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Encode key/value [N, H, d] into the slots [N] of cache [num_blocks, page_bytes]."""
        lay = self.layout
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        if slots.numel() == 0:
            return
        rows = self.encode(key, value)
        flat = cache.view(-1)
        block, offset = slots // lay.block_size, slots % lay.block_size
        head = torch.arange(lay.num_kv_heads, device=slots.device)
        base = (block * lay.page_bytes).view(-1, 1) + (head * lay.head_stride).view(1, -1)  # [N, H]
        for name, region in lay.regions.items():
            row = region.row_bytes
            start = base + region.offset + (offset * row).view(-1, 1)
            idx = start.unsqueeze(-1) + torch.arange(row, device=slots.device)
            flat[idx.reshape(-1)] = rows[name].reshape(-1).to(flat.device)

    def read_blocks(self, cache: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw rows of the given blocks in order: {region: uint8 [len(blocks) · block_size, H, row]}."""
        lay = self.layout
        pages = cache[blocks.long()].view(-1, lay.num_kv_heads, lay.head_stride)
        out = {}
        for name, region in lay.regions.items():
            size = lay.block_size * region.row_bytes
            r = pages[:, :, region.offset: region.offset + size]
            r = r.reshape(-1, lay.num_kv_heads, lay.block_size, region.row_bytes).transpose(1, 2)
            out[name] = r.reshape(-1, lay.num_kv_heads, region.row_bytes)
        return out

    def read_tokens(self, cache: torch.Tensor, blocks: torch.Tensor,
                    num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the first num_tokens tokens stored in `blocks` → key, value [T, H, d] float32."""
        rows = {k: v[:num_tokens] for k, v in self.read_blocks(cache, blocks).items()}
        return self.decode(rows)
