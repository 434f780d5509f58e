"""The vLLM attention backend for turboquant_* kv_cache_dtypes.

Pages are each layer's raw uint8 KV buffer viewed as [num_blocks, page_bytes] (byte layout in
`vllm_turboquant.codec.layout`). vLLM calls `do_kv_cache_update` (encode new K/V into their slots)
and then `forward` (attend over the pages). On CUDA, K/V writes run the fused Triton write
kernel, and every token reads the context cached before its step through the Triton paged kernel
over the packed pages (`vllm_turboquant.kernels`): decode, chunked prefill, prefix hits,
speculative tokens, sliding windows. In multi-token steps the step's own new tokens attend to each
other exactly with FlashAttention (as on a bf16 cache) and the two halves merge by log-sum-exp, so
a long prompt chunk never decodes pages quadratically. On CPU everything runs the pure-PyTorch
codec. Uniform decode batches are CUDA-graph safe (no host syncs): vLLM captures them whole.

Newest tokens exact: every layer keeps fp16 copies of each running sequence's newest
TURBOQUANT_EXACT_RECENT tokens (codec/recent.py), written with the pages and read instead of them
where their tags match; the buffer is allocated with the layer, before vLLM measures free memory.
Each request keeps one ring of copies for its lifetime (`ring_rows.py`), wherever the model
runner puts it in a step's batch.

Outlier channels: each layer fixes its per-KV-head outlier split and key means from the K/V of a
built-in calibration prompt the worker prefills when it starts (`engine_calibration.py`), or,
where that is skipped, from the first real K/V it writes (dummy/profiling runs write only slot -1,
and vLLM's GPU warm-up steps of dummy prompts are recognised, `warmup.py`: both are ignored).
Every page that is ever read is written after that moment with that split, and the split never
changes for the engine's lifetime, so pages reused by prefix caching or read after
preemption/resume always decode with the split they were written with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionLayer, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)

from ..codec import LayerKVCodec, RecentTokens, dense_attention, page_layout, paged_attention
from ..codec.formats import FORMATS, SUPPORTED_HEAD_SIZES, is_turboquant_dtype
from ..codec.layout import BLOCK_SIZE_MULTIPLE
from ..kernels import to_device_async
from . import options
from .engine_calibration import calibrate_at_engine_start, calibrating
from .ring_rows import current_engine_rings, engine_rings, track_request_order
from .warmup import in_vllm_warmup, watch_vllm_warmup

if TYPE_CHECKING:
    from ..kernels.dense_context import ContextSpan

# Rows with at least this many new tokens read their cached context densely (decoded once into
# bf16 K/V, then FlashAttention); shorter ones through the paged kernel, whose 16-token query
# tiles each decode the context again. Dense K/V scratch is bounded per read; longer contexts go
# in pieces.
DENSE_MIN_QUERY = 64
DENSE_SCRATCH_BYTES = 256 << 20


class TurboQuantBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(FORMATS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # registered as AttentionBackendEnum.CUSTOM

    @staticmethod
    def get_impl_cls() -> type["TurboQuantImpl"]:
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls() -> type["TurboQuantMetadataBuilder"]:
        return TurboQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # One flat page per block; the codec's layout addresses bytes inside it. -1 lets the view
        # infer page_bytes, which vLLM has already sized exactly through TQFullAttentionSpec.
        if is_turboquant_dtype(cache_dtype_str):
            lay = page_layout(cache_dtype_str, head_size, block_size, num_kv_heads)
            return (num_blocks, lay.page_bytes)
        return (num_blocks, -1)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return is_turboquant_dtype(kv_cache_dtype)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class ContextQueries:
    """One group of a multi-token step's query tokens that have cached context to read (not
    fresh prompts), chosen on the host when the step's metadata is built (CUDA only). A step has
    up to two groups: single-token rows (decodes), which the kernel runs with decode tiles and
    split-K, and multi-token rows (chunks, prefix hits, speculative tokens), with query tiles."""
    tokens: torch.Tensor           # [n] their indices in the step's queries (device)
    query_start_loc: torch.Tensor  # [num_reqs + 1] (device): fresh prompts keep no queries
    max_query_len: int
    num_step_tokens: int           # all (unpadded) query tokens of the step
    every_token: bool              # tokens == arange(num_step_tokens): skip the gather
    pieces: tuple["DensePiece", ...] = ()  # long chunks: the same rows, read densely

    @property
    def rows(self) -> torch.Tensor | slice:
        return slice(0, self.num_step_tokens) if self.every_token else self.tokens


@dataclass
class DensePiece:
    """Part of a long-chunk group's context, decoded at once into dense K/V (kernels/
    dense_context.py) and attended with FlashAttention: the rows with keys in it and which cached
    positions of each (a context too long for one scratch buffer spans several pieces, whose
    results merge by log-sum-exp like the groups')."""
    queries: ContextQueries
    span: "ContextSpan"


@dataclass
class TurboQuantMetadata:
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor      # [num_reqs + 1], on the host
    seq_lens: torch.Tensor | None      # [num_reqs] on the host (CPU; CUDA multi-token steps)
    query_start_loc_device: torch.Tensor  # [num_reqs + 1], where the kernels run
    seq_lens_device: torch.Tensor      # [num_reqs], where the kernels run
    block_table: torch.Tensor          # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor         # [num_tokens]
    causal: bool = True
    context: tuple[ContextQueries, ...] = ()    # CUDA multi-token steps; (): all fresh
    recent_entries: torch.Tensor | None = None  # [num_tokens], filled by the step's first write


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    # Decode runs the Triton kernel with static grids and no host syncs, so uniform single-token
    # decode batches may be captured whole. Mixed batches read host-side lengths (fresh-prefill
    # check, FlashAttention's max lengths): those stay piecewise.
    _cudagraph_support: ClassVar[AttentionCGSupport] = \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        from ..kernels.cache_write import MAX_HEAD_DIM

        specs = getattr(kv_cache_spec, "kv_cache_specs", None)  # hybrid models: one per layer
        sizes = [sp.head_size for sp in specs.values()] if specs else [kv_cache_spec.head_size]
        if max(sizes) > MAX_HEAD_DIM:
            # Those layers write through the PyTorch codec (host syncs): no graph may hold them.
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        specs = getattr(kv_cache_spec, "kv_cache_specs", None)  # hybrid models: one per layer
        widest = max(sp.num_kv_heads * sp.head_size
                     for sp in (specs.values() if specs else [kv_cache_spec]))
        self.dense_tokens = max(DENSE_MIN_QUERY, DENSE_SCRATCH_BYTES // (4 * widest))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TurboQuantMetadata:
        cam = common_attn_metadata
        num_reqs = cam.num_reqs
        on_gpu = self.device.type == "cuda"
        # Host lengths. On a GPU, reading cam.seq_lens_cpu copies them from the device (vLLM's
        # GPU model runner v2 keeps none): a sync every step that stalls async scheduling.
        # Decode needs none; multi-token steps use the host upper bound, exact for every row
        # that can be a fresh prompt (a row it overstates only reads an empty context).
        seq_lens = None
        if not on_gpu:
            seq_lens = cam.seq_lens  # already on the host
        elif cam.max_query_len > 1:
            seq_lens = cam.seq_lens_cpu_upper_bound
            seq_lens = (cam.seq_lens_cpu if seq_lens is None else seq_lens)[:num_reqs]
        qsl = cam.query_start_loc_cpu
        rings = current_engine_rings()
        if rings is not None:  # this step's batch rows -> their requests' exact-copy rings
            rings.update()
        return TurboQuantMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            num_reqs=num_reqs,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            query_start_loc_device=cam.query_start_loc,
            seq_lens_device=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            causal=bool(cam.causal) if not isinstance(cam.causal, torch.Tensor) else True,
            context=(_context_queries(qsl[: num_reqs + 1], seq_lens, self.device,
                                      cam.query_start_loc[: num_reqs + 1],
                                      cam.seq_lens[:num_reqs], self.dense_tokens)
                     if on_gpu and seq_lens is not None else ()),
        )


class TurboQuantImpl(AttentionImpl[TurboQuantMetadata]):
    supports_quant_query_input: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **kwargs) -> None:
        if not is_turboquant_dtype(kv_cache_dtype):
            raise ValueError(f"TurboQuantImpl got kv_cache_dtype={kv_cache_dtype!r}")
        if alibi_slopes is not None or logits_soft_cap:
            raise ValueError("TurboQuant attention does not support ALiBi or logits soft-capping; "
                             "use kv_cache_dtype='auto' or 'fp8' for this model.")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"TurboQuant compresses decoder self-attention only, got {attn_type}.")
        if kv_sharing_target_layer_name is not None:
            # The reading layer would need the writing layer's outlier split and means.
            raise ValueError("TurboQuant does not support cross-layer KV-cache sharing yet "
                             f"(this layer reads {kv_sharing_target_layer_name}'s cache); use "
                             "kv_cache_dtype='auto' or 'fp8' for this model.")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        # Same page bytes either way (options.full_attention_dtype checks), so vLLM's sizing by
        # kv_cache_dtype holds for every layer.
        self.kv_cache_dtype = (kv_cache_dtype if sliding_window is not None
                               else options.full_attention_dtype(kv_cache_dtype, head_size))
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.codec: LayerKVCodec | None = None  # built at the first write, once block_size is known
        self.recent = _recent_tokens(self.num_kv_heads, head_size)
        self._device: torch.device | None = None  # where its K/V live, from the first real write
        watch_vllm_warmup()
        calibrate_at_engine_start()

    def _codec_for(self, kv_cache: torch.Tensor) -> LayerKVCodec:
        if self.codec is None:
            lay = page_layout(self.kv_cache_dtype, self.head_size, self._kv_block_size(kv_cache),
                              self.num_kv_heads)
            self.codec = LayerKVCodec(lay, qjl_decode=options.qjl_decode(),
                                      center_keys=options.center_keys())
        return self.codec

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        codec = self._codec_for(kv_cache)
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        # CUDA-graph capture writes only padding slots and must not sync: calibration waits for
        # the first real (eager: prefills are never captured whole) write.
        capturing = key.is_cuda and torch.cuda.is_current_stream_capturing()
        if not codec.calibrated and not capturing:
            if key.is_cuda:  # build device tables and compile now, never inside a capture
                self._prepare_kernels(codec, key.device, key.dtype)
            if not in_vllm_warmup():  # vLLM's steps of dummy prompts are stored, never learned from
                valid = slot_mapping >= 0
                if not bool(valid.any()):
                    return  # a dummy run: nothing to store, nothing to learn from
                self._device = key.device
                if calibrating():  # the engine-start prompt: fixed once it has been read whole
                    codec.observe(key[valid], value[valid])
                else:
                    codec.calibrate(key[valid], value[valid])
                    self._refresh_kernel_constants(codec)
        pages = kv_cache.view(kv_cache.shape[0], -1)
        entries = self._recent_entries(layer, slot_mapping)
        recent = self.recent if entries is not None else None
        if key.is_cuda:  # fused Triton write: no host syncs, one launch for K and V
            from ..kernels.cache_write import write_kv

            write_kv(codec, pages, slot_mapping, key, value, recent, entries)
        else:
            codec.write(pages, slot_mapping, key, value)
            if recent is not None:
                recent.write(codec, pages, slot_mapping, entries, key, value)

    def _recent_entries(self, layer: AttentionLayer,
                        slot_mapping: torch.Tensor) -> torch.Tensor | None:
        """Ring entries of this step's new tokens (see RecentTokens.entries), computed once per
        step and shared by the layers of one metadata (device ops: fine inside a CUDA graph)."""
        if self.recent is None:
            return None
        from vllm.model_executor.layers.attention.attention import get_attention_context

        m = get_attention_context(layer.layer_name)[0]
        if not isinstance(m, TurboQuantMetadata):
            return None  # profiling or micro-batched steps: nothing is staged
        if m.recent_entries is None:
            num_reqs = m.num_reqs
            m.recent_entries = self.recent.entries(
                slot_mapping, m.query_start_loc_device[: num_reqs + 1], m.seq_lens_device[:num_reqs])
        return m.recent_entries

    @property
    def calibrated(self) -> bool:
        return self.codec is not None and self.codec.calibrated

    def finish_calibration(self) -> None:
        """End of the engine-start calibration prompt (engine_calibration.py): fix the split
        from everything this layer observed."""
        if self.codec is not None and not self.codec.calibrated:
            self.codec.finish_calibration()
            self._refresh_kernel_constants(self.codec)

    def _refresh_kernel_constants(self, codec: LayerKVCodec) -> None:
        """Calibration changed the codec: rebuild the write and attention kernels' device tables
        now, outside any attention call. Left to the first attention over the cache, each layer
        rebuilt them there (host-side rotations, copies that wait for the GPU): ~0.5 s of that
        step's host time on an H100 (Llama-3.1-8B shape, 32 layers, stack sampler)."""
        device = self._device
        if not codec.calibrated or device is None or device.type != "cuda":
            return
        from ..kernels.cache_write import device_constants
        from ..kernels.paged_attention import AttentionConstants

        device_constants(codec, device)
        AttentionConstants.of(codec, self.num_heads, device)

    def _prepare_kernels(self, codec: LayerKVCodec, device: torch.device,
                         dtype: torch.dtype) -> None:
        if getattr(self, "_kernels_ready", False):
            return
        from ..kernels.cache_write import device_constants
        from ..kernels.paged_attention import warm_up

        device_constants(codec, device)
        warm_up(codec, self.num_heads, device, self.sliding_window, self.recent, dtype)
        self._kernels_ready = True

    def _kv_block_size(self, kv_cache: torch.Tensor) -> int:
        # page_bytes = block_size · num_kv_heads · slot_bytes; recover block_size from the view.
        slot = FORMATS[self.kv_cache_dtype].bytes_per_token_head(self.head_size)
        page_bytes = kv_cache[0].numel()
        return page_bytes // (self.num_kv_heads * slot)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: TurboQuantMetadata,
                output: torch.Tensor | None = None, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        assert output is not None, "TurboQuant attention writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by TurboQuant")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        out = self._attend(query[:n], key, value, kv_cache, m)
        output[:n].view(out.shape).copy_(out)  # casts; `out` may be a transposed view
        return output

    def _attend(self, q: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                kv_cache: torch.Tensor, m: TurboQuantMetadata) -> torch.Tensor:
        n = q.shape[0]
        if m.max_query_len > 1 and key is not None:
            k, v = key[:n], value[:n]
            if q.is_cuda and m.causal:
                out = self._new_and_cached(q, k, v, kv_cache, m)
                if out is not None:
                    return out
            qsl = m.query_start_loc
            if bool((m.seq_lens == qsl[1:] - qsl[:-1]).all()):  # host tensors: fresh prompts
                return self._fresh_prefill(q, k, v, m)
        return self._cached_attention(q, kv_cache, m)

    def _new_and_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_cache: torch.Tensor, m: TurboQuantMetadata) -> torch.Tensor | None:
        """Multi-token steps on CUDA (prompts, chunked prefill, prefix hits, decodes mixed with
        prompts): the step's new tokens attend to each other exactly, with FlashAttention on the
        K/V just computed (as a bf16 cache would; with exact newest tokens on, the values the
        pages' exact copies hold), and to the context cached before the step through the
        compressed pages; the halves merge by log-sum-exp. None: no FlashAttention here."""
        new = _flash_attention(q, k, v, m, self.scale, self.sliding_window,
                               return_lse=bool(m.context))
        if new is None or not m.context:
            return new
        from ..kernels.paged_attention import merge_attention

        out, lse = new[0].float(), _base2_lse(new[1])
        for rows, ctx_out, ctx_lse in self._context_reads(q, kv_cache, m):
            # A row cut across dense pieces merges more than once: keep its lse current.
            out[rows] = merge_attention(ctx_out, ctx_lse, out[rows], lse[rows])
            lse[rows] = torch.logaddexp2(ctx_lse, lse[rows])
        return out

    def _context_reads(self, q: torch.Tensor, kv_cache: torch.Tensor, m: TurboQuantMetadata):
        """(rows, out, base-2 lse) of each read of the context cached before a multi-token step:
        a long-chunk group piece by piece, densely; the other groups, and every group of a
        sliding-window layer (it reads only its window), through the paged kernel."""
        for ctx in m.context:
            if ctx.pieces and self.sliding_window is None:
                for piece in ctx.pieces:
                    rows = piece.queries.rows
                    yield rows, *self._dense_context(q[rows], kv_cache, m, piece)
            else:
                yield ctx.rows, *self._cached_attention(q[ctx.rows], kv_cache, m, ctx)

    def _dense_context(self, q: torch.Tensor, kv_cache: torch.Tensor, m: TurboQuantMetadata,
                       piece: DensePiece) -> tuple[torch.Tensor, torch.Tensor]:
        """A piece's rows over its cached positions: decoded once to dense K/V, FlashAttention
        (nothing causal: every key precedes every query). (out float32, base-2 lse)."""
        from ..kernels.dense_context import dequantize_context

        num_reqs = m.num_reqs
        dtype = _fa_dtype(q)
        k, v = dequantize_context(self._codec_for(kv_cache), kv_cache.view(kv_cache.shape[0], -1),
                                  m.block_table[:num_reqs], m.seq_lens_device[:num_reqs],
                                  piece.span, self.num_heads, dtype, self.recent)
        qs = piece.queries
        out, lse = _flash_varlen(q.to(dtype), k, v, qs.query_start_loc, qs.max_query_len,
                                 piece.span.cu_keys, piece.span.max_keys, self.scale,
                                 causal=False, window=None, return_lse=True)
        lse = _base2_lse(lse)
        # A row left with no key (only if the host over-stated its context) must weigh nothing.
        return out.float().masked_fill(torch.isneginf(lse)[..., None], 0.0), lse

    def _cached_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, m: TurboQuantMetadata,
                          context: ContextQueries | None = None):
        """Attention through the pages: every key up to each query (causal), or with `context`
        only the keys cached before the step, with the log-sum-exp (see _new_and_cached)."""
        codec = self._codec_for(kv_cache)
        pages = kv_cache.view(kv_cache.shape[0], -1)
        num_reqs = m.num_reqs
        if q.is_cuda:
            from ..kernels.paged_attention import varlen_attention

            qsl, max_q = m.query_start_loc_device[: num_reqs + 1], m.max_query_len
            if context is not None:
                qsl, max_q = context.query_start_loc, context.max_query_len
            return varlen_attention(codec, q, pages, m.block_table[:num_reqs],
                                    m.seq_lens_device[:num_reqs], qsl, self.scale, max_q,
                                    self.sliding_window, recent=self.recent,
                                    context_only=context is not None,
                                    return_lse=context is not None)
        return paged_attention(codec, q, pages, m.block_table, m.seq_lens, m.query_start_loc,
                               self.scale, m.causal, self.sliding_window, self.recent)

    def _fresh_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       m: TurboQuantMetadata) -> torch.Tensor:
        """Fresh prompts without FlashAttention (CPU): exact attention, one prompt at a time."""
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        starts = m.query_start_loc.tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            if b > a:
                out[a:b] = dense_attention(q[a:b], k[a:b], v[a:b], self.scale, m.causal,
                                           self.sliding_window)
        return out


def _recent_tokens(num_kv_heads: int, head_size: int) -> RecentTokens | None:
    """The layer's exact-newest-tokens buffer, sized from the engine's config (None: turned off,
    or no engine config, e.g. a layer built by hand in a test)."""
    from vllm.config import get_current_vllm_config_or_none

    window, config = options.exact_recent(), get_current_vllm_config_or_none()
    if window == 0 or config is None:
        return None
    max_seqs = config.scheduler_config.max_num_seqs
    rows = options.exact_rows(max_seqs)
    if rows == 0:
        return None
    device = config.device_config.device
    if rows < max_seqs:
        from vllm.logger import init_logger

        # under "vllm.": vLLM's handlers print it in every process (ours would need their own)
        init_logger("vllm.turboquant").warning_once(
            "TurboQuant keeps exact copies of the newest %d tokens for %d running requests "
            "(TURBOQUANT_EXACT_ROWS) but max_num_seqs is %d: requests beyond %d read those "
            "tokens compressed. Set TURBOQUANT_EXACT_ROWS=%d (%.1f MiB per layer) or "
            "--max-num-seqs %d for every request to get them.", window, rows, max_seqs, rows,
            max_seqs, RecentTokens.nbytes_per_layer(max_seqs, window, num_kv_heads, head_size)
            / 2**20, rows)
    track_request_order()
    rings = engine_rings(config, rows, max_seqs, device)
    return RecentTokens(rows, window, num_kv_heads, head_size, device, rings.ring_of_row)


def _context_queries(qsl: torch.Tensor, seq_lens: torch.Tensor, device: torch.device,
                     qsl_device: torch.Tensor | None = None,
                     seq_lens_device: torch.Tensor | None = None,
                     dense_tokens: int = 0) -> tuple[ContextQueries, ...]:
    """Host-side selection of the query tokens that read cached context, as groups of
    single-token rows, of short multi-token rows and of rows of >= DENSE_MIN_QUERY tokens (any
    may be absent; none: every sequence is a fresh prompt). A decode mixed into a step with a
    long chunk would otherwise run with the chunk's query tiles and without split-K. The long
    group also carries its dense pieces (given dense_tokens, the positions one piece may decode,
    and the device lengths). Copied to the device through pinned memory: no sync."""
    q_lens = qsl[1:] - qsl[:-1]
    has_ctx = seq_lens > q_lens
    short = q_lens < DENSE_MIN_QUERY
    groups = []
    for sel in (has_ctx & (q_lens == 1), has_ctx & (q_lens > 1) & short, has_ctx & ~short):
        if bool(sel.any()):
            groups.append(_group(sel, qsl, device))
    if dense_tokens and groups and not bool(short[has_ctx].all()):
        from ..kernels.dense_context import context_span

        limit = seq_lens_device - (qsl_device[1:] - qsl_device[:-1])  # exact context lengths
        pieces = _dense_pieces(has_ctx & ~short, seq_lens - q_lens, dense_tokens)
        groups[-1].pieces = tuple(DensePiece(_group(ends > starts, qsl, device),
                                             context_span(starts, ends, device, limit))
                                  for starts, ends in pieces)
    return tuple(groups)


def _group(sel: torch.Tensor, qsl: torch.Tensor, device: torch.device) -> ContextQueries:
    """The query tokens of the rows `sel` (host bool [num_reqs])."""
    q_lens = qsl[1:] - qsl[:-1]
    kept = torch.where(sel, q_lens, torch.zeros_like(q_lens))
    sub_qsl = torch.zeros(qsl.shape[0], dtype=torch.int32)
    torch.cumsum(kept, 0, out=sub_qsl[1:])
    tokens = torch.repeat_interleave(sel, q_lens.long()).nonzero().squeeze(1)
    return ContextQueries(tokens=to_device_async(tokens, device),
                          query_start_loc=to_device_async(sub_qsl, device),
                          max_query_len=int(kept.max()), num_step_tokens=int(qsl[-1]),
                          every_token=bool(sel.all()))


def _dense_pieces(sel: torch.Tensor, ctx_lens: torch.Tensor,
                  capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut the cached contexts of rows `sel` into pieces of at most `capacity` positions, in row
    order: (starts, ends) host [num_reqs] per piece (ends == starts: the row is not in it)."""
    pieces, used = [], 0
    starts = torch.zeros_like(ctx_lens)
    ends = torch.zeros_like(ctx_lens)
    for b in sel.nonzero().flatten().tolist():
        a, n = 0, int(ctx_lens[b])
        while a < n:
            take = min(n - a, capacity - used)
            starts[b], ends[b] = a, a + take
            a, used = a + take, used + take
            if used == capacity:
                pieces.append((starts.clone(), ends.clone()))
                starts.zero_(), ends.zero_()
                used = 0
    if used:
        pieces.append((starts, ends))
    return pieces


def _fa_dtype(q: torch.Tensor) -> torch.dtype:
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _base2_lse(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's natural log-sum-exp [Hq, T] → base 2 [T, Hq]. A row with no key gets
    +inf from FlashAttention; merge_attention wants -inf."""
    from ..kernels.paged_attention import LOG2E

    lse = lse.float().T * LOG2E
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                  max_q: int, cu_k: torch.Tensor, max_k: int, scale: float, causal: bool,
                  window: int | None, return_lse: bool):
    """vLLM's FlashAttention, varlen, on q/k/v of one dtype; None where this vLLM build has no
    FlashAttention for the GPU. With return_lse: (out, natural log-sum-exp [Hq, T])."""
    try:
        from vllm.v1.attention.backends.fa_utils import (flash_attn_varlen_func,
                                                         get_flash_attn_version)
        version = get_flash_attn_version(head_size=q.shape[-1])
    except Exception:  # noqa: BLE001 - no FlashAttention in this build: the caller falls back
        return None
    if version is None:
        return None
    sides = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_varlen_func(q, k, v, max_seqlen_q=max_q, cu_seqlens_q=cu_q,
                                  max_seqlen_k=max_k, cu_seqlens_k=cu_k, softmax_scale=scale,
                                  causal=causal, window_size=list(sides),
                                  return_softmax_lse=return_lse, fa_version=version)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: TurboQuantMetadata,
                     scale: float, sliding_window: int | None, return_lse: bool = False):
    """Each sequence's new tokens over their own exact K/V, causal (for a fresh prompt: what the
    bf16 cache would do); with return_lse also the natural log-sum-exp [Hq, T]. None: no
    FlashAttention here."""
    dtype = _fa_dtype(q)
    qsl = m.query_start_loc_device
    return _flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), qsl, m.max_query_len, qsl,
                         m.max_query_len, scale, causal=True, window=sliding_window,
                         return_lse=return_lse)
