"""KVTC attention backend for vLLM 0.32: the paged KV cache itself is compressed.

Each full-attention layer's cache is ``[num_blocks, num_kv_heads, block_size,
SLOT_BYTES]`` uint8 (docs/kvtc-layout.md); ``customize_spec`` declares
SLOT_BYTES so vLLM's allocator, its "KV cache size: N tokens" and its
scheduler all see the real page. vLLM calls ``do_kv_cache_update`` (compress
the step's new K/V into their slots) and then ``forward`` (attention of the
step's queries over the compressed history, with the step's own tokens exact).

One glue path for every device; only the two ops differ (:mod:`kvtc_ops`):
the codec's torch reference on CPU, the Triton kernels on CUDA.

Tokens kept exact: the position-0 attention sink (LNARIZE_KVTC_SINK_TOKENS=1,
from the calibration's constants, :mod:`sink`), and the tokens of a prefill
chunk (more than DECODE_MAX_QUERY tokens of one sequence in a step), which
attend to each other with their uncompressed K/V; decode and MTP-verify rows
read everything else, themselves included, from the compressed cache (what
the GPU decode kernel does), except each row's last LNARIZE_KVTC_WINDOW_TOKENS
positions, served exactly from the window pool (:mod:`window`).

Under CUDA graphs vLLM pads key/value/query (and, in its V2 runner, the slot
mapping with -1) to a captured token count: only the first
``num_actual_tokens`` rows are the step's; the glue never reads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lnarize_serve.kvtc.format.calibration import Calibration, CalibrationError
from lnarize_serve.kvtc.format.codec import LayerCodec
from lnarize_serve.kvtc.serving.kvtc_ops import (
    DECODE_MAX_QUERY,
    ExactTokens,
    KVTCOps,
    kvtc_attention,
    kvtc_write,
    ops_for_device,
    real_request_count,
)
from lnarize_serve.kvtc.serving.model_codecs import layer_index_for, load_serving_calibration
from lnarize_serve.kvtc.serving.runtime_config import KVTCConfigError, KVTCRuntimeConfig
from lnarize_serve.kvtc.serving.sink import SinkConstants
from lnarize_serve.kvtc.serving.window import (
    LayerWindow,
    WindowPool,
    WindowStep,
    pool_entries,
    pool_window,
)


logger = init_logger(__name__)

# Logged once per process when the first decode/verify rows are served (the
# server's warm-up should make this appear before "phase=ready").
FIRST_DECODE_LOG = "KVTC decode path ran: first decode/verify rows served by the compressed cache"


# The settings this process's KVTC layers were built with (see _runtime).
_process_runtime: KVTCRuntimeConfig | None = None


def _runtime(vllm_config: VllmConfig | None = None) -> KVTCRuntimeConfig:
    """The KVTC settings of the engine's ``VllmConfig`` (the one given, else
    the current one).

    Fallback: vLLM calls ``customize_spec`` with the spec alone, and in the
    worker outside any current config (KV cache spec collection, the hybrid
    block-size alignment); both run after the model's layers were built, so
    the settings those layers read from the config stand for this process.
    """
    global _process_runtime
    config = vllm_config or get_current_vllm_config_or_none()
    if config is not None:
        _process_runtime = KVTCRuntimeConfig.from_additional_config(config.additional_config)
        return _process_runtime
    if _process_runtime is None:
        raise KVTCConfigError(
            "the KVTC attention backend was asked for its settings with no current vLLM "
            "config and before any KVTC layer was built in this process"
        )
    return _process_runtime


def _calibration() -> Calibration:
    return load_serving_calibration(_runtime().calibration_path)


class KVTCAttentionBackend(AttentionBackend):
    """Compressed paged KV cache (KVTC slots), for decoder full attention."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    # The slot format is KVTC's own; vLLM's kv_cache_dtype stays "auto".
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to the registry slot this class occupies.
        from vllm.platforms import current_platform

        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVTCAttentionImpl]:
        return KVTCAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVTCMetadataBuilder]:
        return KVTCMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # head-major inside a block: one (sequence, KV head) streams its slots
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        # the decode/prefill split is planned from the CPU query lengths
        return False

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Declare the compressed bytes per token per KV head (idempotent)."""
        if spec.state_content_bytes is not None:
            return spec
        calibration = _calibration()
        if spec.head_size != calibration.head_dim:
            raise CalibrationError(
                f"KVTC calibration has head_dim {calibration.head_dim}, the model "
                f"{spec.head_size}"
            )
        # The cache is bytes: a uint8 view, C = SLOT_BYTES.
        return replace(spec, dtype=torch.uint8, state_content_bytes=calibration.slot_bytes)


@dataclass
class KVTCMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1]
    seq_lens: torch.Tensor  # [num_reqs], context length after this step
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_tokens]
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor | None
    window: WindowStep | None = None  # this step's recent-token window bookkeeping


class KVTCMetadataBuilder(AttentionMetadataBuilder[KVTCMetadata]):
    # The reference op walks sequences in Python; no CUDA-graph capture.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # vLLM moves rows with at most this many tokens to the front, so the
        # decode/verify rows form a prefix the decode op takes in one call.
        self.reorder_batch_threshold = DECODE_MAX_QUERY
        window = _runtime(vllm_config).window_tokens
        self.window_pool = None
        if window:
            entries = pool_entries(vllm_config.scheduler_config.max_num_seqs, window)
            self.window_pool = WindowPool(pool_window(window), entries,
                                          kv_cache_spec.block_size, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KVTCMetadata:
        cam = common_attn_metadata
        window = None
        if self.window_pool is not None:
            # padded requests (captured batch sizes) get no window entries
            num_reqs = real_request_count(cam.query_start_loc_cpu[: cam.num_reqs + 1])
            window = self.window_pool.step(
                cam.block_table_tensor[:num_reqs], cam.seq_lens[:num_reqs],
                cam.slot_mapping[: cam.num_actual_tokens])
        return KVTCMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            query_start_loc_cpu=cam.query_start_loc_cpu,
            seq_lens_cpu=cam.seq_lens_cpu_upper_bound,
            window=window,
        )


class KVTCAttentionImpl(AttentionImpl[KVTCMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            "learned attention sinks": sinks is not None,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype != "auto",
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
        }
        refused = [name for name, hit in unsupported.items() if hit]
        if refused:
            raise NotImplementedError(f"KVTC attention does not support: {', '.join(refused)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sliding_window = None
        runtime = _runtime()
        self.calibration = load_serving_calibration(runtime.calibration_path)
        self.exact_sink = runtime.sink_tokens > 0
        self.window_tokens = runtime.window_tokens
        if self.exact_sink and not self.calibration.sink_keys:
            raise CalibrationError(
                "LNARIZE_KVTC_SINK_TOKENS=1 needs a calibration with position-0 sink "
                "constants; this one has none"
            )
        if (head_size, self.num_kv_heads) != (
            self.calibration.head_dim,
            self.calibration.num_kv_heads,
        ):
            raise CalibrationError(
                f"KVTC calibration is for {self.calibration.num_kv_heads} KV heads of dim "
                f"{self.calibration.head_dim}; this layer has {self.num_kv_heads} of dim "
                f"{head_size}"
            )
        # per layer name: the layer's codec on the cache's device, its exact
        # sink (None: compressed like any token), and the ops
        self._layer_codecs: dict[str, LayerCodec] = {}
        self._layer_sinks: dict[str, SinkConstants | None] = {}
        self._layer_windows: dict[str, LayerWindow] = {}
        self._ops: KVTCOps | None = None
        self._decode_seen = False

    def _index_of(self, layer: AttentionLayer) -> int:
        return layer_index_for(
            layer.layer_name, self.calibration.layer_indices, self.calibration.num_model_layers
        )

    def _codec_for(self, layer: AttentionLayer, device: torch.device) -> LayerCodec:
        name = layer.layer_name
        codec = self._layer_codecs.get(name)
        if codec is None:
            codec = self.calibration.layers[self._index_of(layer)].to(device)
            self._layer_codecs[name] = codec
        return codec

    def _sink_for(self, layer: AttentionLayer, dtype: torch.dtype,
                  device: torch.device) -> SinkConstants | None:
        name = layer.layer_name
        if name not in self._layer_sinks:
            sink = None
            if self.exact_sink:
                codec = self._codec_for(layer, device)
                ops = self._ops_for(device)
                sink = SinkConstants.for_layer(
                    self.calibration, self._index_of(layer),
                    lambda k, v, cache, slots: ops.write(k, v, cache, slots, codec),
                    dtype, device)
            self._layer_sinks[name] = sink
        return self._layer_sinks[name]

    def _ops_for(self, device: torch.device) -> KVTCOps:
        if self._ops is None:
            self._ops = ops_for_device(device)
        return self._ops

    def _exact_for(self, layer: AttentionLayer, dtype: torch.dtype, device: torch.device,
                   meta: KVTCMetadata | None) -> ExactTokens:
        step = meta.window if meta is not None else None
        window = None
        if step is not None:
            window = self._layer_windows.get(layer.layer_name)
            if window is None:
                # allocated on the first step (a few MB: entries x 16 slots)
                window = LayerWindow(step.entries, self.num_kv_heads, self.head_size, dtype,
                                     device, step.sub_block)
                self._layer_windows[layer.layer_name] = window
        return ExactTokens(self._sink_for(layer, dtype, device), window, step, self.window_tokens)

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if slot_mapping.shape[0] == 0:
            return
        device = kv_cache.device
        meta = get_attention_context(layer.layer_name)[0]
        # key/value (and in the V2 runner the slot mapping) are padded to the
        # CUDA-graph size; the step's tokens are the first num_actual_tokens
        kvtc_write(
            self._ops_for(device), key, value, kv_cache.view(torch.uint8), slot_mapping,
            self._codec_for(layer, device), self._exact_for(layer, key.dtype, device, meta),
            num_actual_tokens=None if meta is None else meta.num_actual_tokens,
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVTCMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KVTC attention does not fuse output quantization")
        assert output is not None
        if attn_metadata is None:  # profiling run: no cache, no work
            return output
        num_tokens = attn_metadata.num_actual_tokens
        codec = self._codec_for(layer, kv_cache.device)
        meta = attn_metadata
        result = kvtc_attention(  # rows past num_actual_tokens are CUDA-graph padding
            self._ops_for(kv_cache.device),
            query=query[:num_tokens],
            cache=kv_cache.view(torch.uint8),
            block_table=meta.block_table,
            seq_lens=meta.seq_lens,
            query_start_loc=meta.query_start_loc,
            query_start_loc_cpu=meta.query_start_loc_cpu,
            codec=codec,
            softmax_scale=self.scale,
            exact_keys=None if key is None else key[:num_tokens],
            exact_values=None if value is None else value[:num_tokens],
            max_seq_len=meta.max_seq_len,
            exact=self._exact_for(layer, query.dtype, kv_cache.device, meta),
        )
        rows = result.shape[0]
        output[:rows] = result.reshape(output[:rows].shape).to(output.dtype)
        if not self._decode_seen:
            query_lens = meta.query_start_loc_cpu[1:] - meta.query_start_loc_cpu[:-1]
            if bool(((query_lens > 0) & (query_lens <= DECODE_MAX_QUERY)).any()):
                self._decode_seen = True
                logger.info_once(FIRST_DECODE_LOG)
        return output
