"""`lnarize-serve plan`: how many KV tokens fit, per cache mode, before starting.

The arithmetic mirrors vLLM 0.32's own (see docs/kvtc-vllm.md, "How vLLM turns
bytes into tokens"): pages of `block_size` tokens per layer, hybrid models
padding their linear-attention state pages to the attention page, the number
of blocks = KV memory // bytes per block, and the reported "KV cache size: N
tokens" = max concurrency at max_model_len x max_model_len. The unit tests
compare these numbers with vLLM's own spec classes and with the capacity a
real CPU engine logs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnarize_serve.hf_config import AttentionGeometry, text_config

# Bytes per element of the dtypes a config names for states and weights.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}

GIB = 1024**3


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------
# Cache modes: bytes one token of one KV head occupies (K and V together)
# --------------------------------------------------------------------------


def _turboquant_bytes(head_dim: int, key_bits: int, value_bits: int) -> int:
    # vLLM's TurboQuantConfig: keys are Lloyd-Max indices + an fp16 norm (or
    # raw fp8 at 8 bits), values uniform codes + fp16 scale and zero; the
    # slot is rounded up to an even size.
    key = head_dim if key_bits == 8 else math.ceil(head_dim * key_bits / 8) + 2
    value = math.ceil(head_dim * value_bits / 8) + 4
    slot = key + value
    return slot + slot % 2


def kv_mode_bytes(mode: str, head_dim: int, kvtc_slot_bytes: int | None = None) -> int:
    """Bytes per token per KV head for one of vLLM's cache modes or KVTC."""
    if mode in ("bf16", "auto", "float16", "bfloat16"):
        return 2 * head_dim * 2
    if mode in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        return 2 * head_dim
    if mode == "int4_per_token_head":
        # packed nibbles for K and V plus one fp32 scale each (TritonAttention)
        return head_dim + 2 * 4
    if mode == "nvfp4":
        # packed fp4 plus one fp8 scale per 16 elements, for K and V (FlashInfer)
        return 2 * (head_dim // 2 + head_dim // 16)
    turboquant = {
        "turboquant_k8v4": (8, 4),
        "turboquant_4bit_nc": (4, 4),
        "turboquant_k3v4_nc": (3, 4),
        "turboquant_3bit_nc": (3, 3),
    }
    if mode in turboquant:
        return _turboquant_bytes(head_dim, *turboquant[mode])
    if mode == "kvtc":
        if kvtc_slot_bytes is None:
            raise ValueError("the kvtc mode needs the slot size (kvtc_slot_bytes)")
        return kvtc_slot_bytes
    raise ValueError(f"unknown KV cache mode {mode!r}; known: {', '.join(KV_MODES)}")


KV_MODES = (
    "bf16",
    "fp8",
    "int4_per_token_head",
    "nvfp4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
    "kvtc",
)


def kvtc_slot_bytes_for_budget(head_dim: int, key_bits: float, value_bits: float) -> int:
    """Slot size of a KVTC budget (bits per key / value dim), per the layout."""
    k_bytes = math.ceil(head_dim * key_bits / 8)
    v_bytes = math.ceil(head_dim * value_bits / 8)
    slot = k_bytes + v_bytes
    return slot + slot % 2


def default_kvtc_slot_bytes(head_dim: int) -> int:
    """The slot the planner assumes when no calibration is given: K2V4."""
    return kvtc_slot_bytes_for_budget(head_dim, 2, 4)


# --------------------------------------------------------------------------
# Model geometry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearAttentionGeometry:
    """Gated DeltaNet layers: fixed-size state per sequence, no per-token KV."""

    num_layers: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    conv_dtype_bytes: int
    ssm_dtype_bytes: int

    def state_bytes_per_layer(self, num_speculative_tokens: int = 0) -> int:
        # vLLM's gated_delta_net_state_shape: conv rows grow with the drafts
        conv_dim = 2 * self.key_head_dim * self.num_key_heads
        conv_dim += self.value_head_dim * self.num_value_heads
        conv = conv_dim * (self.conv_kernel - 1 + num_speculative_tokens)
        ssm = self.num_value_heads * self.value_head_dim * self.key_head_dim
        return conv * self.conv_dtype_bytes + ssm * self.ssm_dtype_bytes


@dataclass(frozen=True)
class ModelGeometry:
    name: str
    num_attention_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None = None
    linear: LinearAttentionGeometry | None = None
    weights_bytes: int | None = None
    source: str = ""
    # The MTP head's decoder layers: full attention with the target's KV
    # geometry. vLLM allocates their cache beside the target's whenever MTP
    # speculative decoding is on (one layer serves every draft position).
    num_draft_attention_layers: int = 0

    @property
    def is_hybrid(self) -> bool:
        return self.linear is not None and self.linear.num_layers > 0

    def attention_layers_allocated(self, num_speculative_tokens: int) -> int:
        """Full-attention layers vLLM gives a KV cache: the target's, plus the
        MTP head's while speculative decoding is on."""
        drafts = self.num_draft_attention_layers if num_speculative_tokens > 0 else 0
        return self.num_attention_layers + drafts


def geometry_from_hf_config(
    config: dict[str, Any], name: str = "model", source: str = ""
) -> ModelGeometry:
    """Read the KV-relevant facts from a HF config.json (text part)."""
    text = text_config(config)
    attention = AttentionGeometry.from_config(config)
    num_linear = len(attention.linear_attention_layers)
    linear = None
    if num_linear:
        model_dtype = str(text.get("dtype") or text.get("torch_dtype") or "bfloat16")
        ssm_dtype = str(text.get("mamba_ssm_dtype") or model_dtype)
        linear = LinearAttentionGeometry(
            num_layers=num_linear,
            num_key_heads=int(text["linear_num_key_heads"]),
            num_value_heads=int(text["linear_num_value_heads"]),
            key_head_dim=int(text["linear_key_head_dim"]),
            value_head_dim=int(text["linear_value_head_dim"]),
            conv_kernel=int(text["linear_conv_kernel_dim"]),
            conv_dtype_bytes=_DTYPE_BYTES.get(model_dtype, 2),
            ssm_dtype_bytes=_DTYPE_BYTES.get(ssm_dtype, 4),
        )
    # Qwen3.5/3.6 name the MTP depth mtp_num_hidden_layers, Qwen3-Next and
    # DeepSeek num_nextn_predict_layers.
    num_draft = int(text.get("mtp_num_hidden_layers") or text.get("num_nextn_predict_layers") or 0)
    return ModelGeometry(
        name=name,
        num_attention_layers=len(attention.full_attention_layers),
        num_draft_attention_layers=num_draft,
        num_kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        max_position_embeddings=text.get("max_position_embeddings"),
        linear=linear,
        source=source,
    )


# Qwen3.6-27B, the product's model. Sources: the Qwen/Qwen3.6-27B model card
# ("64 layers; hidden layout 16 x (3 x (Gated DeltaNet -> FFN) -> 1 x (Gated
# Attention -> FFN)); Gated DeltaNet: 48 V heads, 16 QK heads, head dim 128;
# Gated Attention: 24 Q heads, 4 KV heads, head dim 256, rotary dim 64;
# context 262,144") and its config.json text_config (full_attention_interval
# 4, linear_conv_kernel_dim 4, mamba_ssm_dtype "float32", dtype bfloat16,
# mtp_num_hidden_layers 1).
# Weights: an estimate for the NVFP4 checkpoint served language-model-only
# (~27.8B parameters at 4.5 bits in the body + bf16 embeddings and lm_head).
QWEN36_27B = ModelGeometry(
    name="Qwen3.6-27B (LNARIZE NVFP4)",
    num_attention_layers=16,
    num_draft_attention_layers=1,
    num_kv_heads=4,
    head_dim=256,
    max_position_embeddings=262144,
    linear=LinearAttentionGeometry(
        num_layers=48,
        num_key_heads=16,
        num_value_heads=48,
        key_head_dim=128,
        value_head_dim=128,
        conv_kernel=4,
        conv_dtype_bytes=2,
        ssm_dtype_bytes=4,
    ),
    weights_bytes=20 * GIB,
    source="Qwen/Qwen3.6-27B model card + config.json (built in)",
)

BUILTIN_MODELS = {
    "qwen3.6-27b": QWEN36_27B,
    "sakamakismile/Qwen3.6-27B-LNARIZE-NVFP4": QWEN36_27B,
}


def _weights_bytes_in(folder: Path) -> int | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _looks_local(model: str) -> bool:
    # A Hub repo id is "name" or "namespace/name"; anything else is a path.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or model.endswith(".json")


def _hub_config(model: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        return Path(hf_hub_download(model, "config.json"))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read config.json of {model!r}: not a local folder, and the Hugging Face Hub "
            f"answered {type(exc).__name__}: {reason}"
        ) from None


def resolve_geometry(model: str) -> ModelGeometry:
    """A built-in name, a local model folder or config.json, or a HF repo id."""
    if model in BUILTIN_MODELS or model.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS.get(model) or BUILTIN_MODELS[model.lower()]
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
    elif path.is_file():
        config_path = path
    elif _looks_local(model):
        raise ValueError(f"no such model folder or config.json: {model}")
    else:
        config_path = _hub_config(model)
    if not config_path.is_file():
        raise ValueError(f"no config.json for model {model!r} (looked at {config_path})")
    geometry = geometry_from_hf_config(
        json.loads(config_path.read_text()), name=model, source=str(config_path)
    )
    weights = _weights_bytes_in(config_path.parent)
    return geometry if weights is None else _with(geometry, weights_bytes=weights)


def _with(geometry: ModelGeometry, **changes: Any) -> ModelGeometry:
    from dataclasses import replace

    return replace(geometry, **changes)


# --------------------------------------------------------------------------
# Capacity, the way vLLM computes it
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    kv_memory_bytes: int
    max_model_len: int
    max_num_seqs: int
    block_size: int = 16
    kernel_block_alignment: int = 16
    num_speculative_tokens: int = 0
    prefix_caching: bool = False


@dataclass(frozen=True)
class ModeCapacity:
    mode: str
    bytes_per_token_per_head: int
    block_size: int
    num_blocks: int
    blocks_per_request: int
    capacity_tokens: int
    max_concurrency: float
    fits: bool
    ratio_vs_bf16: float = field(default=1.0)


def mode_capacity(
    geometry: ModelGeometry,
    request: PlanRequest,
    mode: str,
    kvtc_slot_bytes: int | None = None,
) -> ModeCapacity:
    per_head = kv_mode_bytes(mode, geometry.head_dim, kvtc_slot_bytes)
    attn_token_bytes = geometry.num_kv_heads * per_head  # one layer, one token
    num_attention_layers = geometry.attention_layers_allocated(request.num_speculative_tokens)
    block_size = request.block_size
    blocks_per_request = 0
    if geometry.is_hybrid:
        assert geometry.linear is not None
        state = geometry.linear.state_bytes_per_layer(request.num_speculative_tokens)
        align = max(request.kernel_block_alignment, request.block_size)
        # vLLM grows the attention block until one attention page holds one
        # linear-attention state, then pads the state page to it.
        block_size = max(
            block_size, align * cdiv(state, align * attn_token_bytes)
        )
        layers_per_group = min(num_attention_layers, geometry.linear.num_layers)
        num_linear_groups = cdiv(geometry.linear.num_layers, layers_per_group)
        num_attn_groups = cdiv(num_attention_layers, layers_per_group)
        states_per_request = (
            2 + request.num_speculative_tokens
            if request.prefix_caching
            else 1 + request.num_speculative_tokens
        )
        blocks_per_request += num_linear_groups * states_per_request
    else:
        layers_per_group = num_attention_layers
        num_attn_groups = 1
    page = block_size * attn_token_bytes
    bytes_per_block = layers_per_group * page
    num_blocks = request.kv_memory_bytes // bytes_per_block
    blocks_per_request += num_attn_groups * cdiv(request.max_model_len, block_size)
    max_concurrency = num_blocks / blocks_per_request
    capacity_tokens = int(max_concurrency * request.max_model_len)
    bf16 = kv_mode_bytes("bf16", geometry.head_dim)
    return ModeCapacity(
        mode=mode,
        bytes_per_token_per_head=per_head,
        block_size=block_size,
        num_blocks=num_blocks,
        blocks_per_request=blocks_per_request,
        capacity_tokens=capacity_tokens,
        max_concurrency=max_concurrency,
        fits=max_concurrency >= request.max_num_seqs,
        ratio_vs_bf16=bf16 / per_head,
    )


def kv_memory_from_gpu(
    gpu_memory_bytes: int, utilization: float, weights_bytes: int, overhead_bytes: int
) -> int:
    """vLLM's KV budget on a GPU: total x utilization minus weights and peak
    activations (here a stated overhead: activations, CUDA graphs, MTP head)."""
    return max(0, int(gpu_memory_bytes * utilization) - weights_bytes - overhead_bytes)


def parse_bytes(text: str) -> int:
    """'96GB' (10^9), '96GiB' (2^30), '512MiB', or a bare number of GiB."""
    units = {
        "tib": 1024**4, "gib": GIB, "mib": 1024**2, "kib": 1024,
        "tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1,
    }
    cleaned = text.strip().lower().replace(" ", "")
    number, factor = cleaned, GIB
    for suffix, unit in units.items():
        if cleaned.endswith(suffix):
            number, factor = cleaned[: -len(suffix)], unit
            break
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 96GB, 80GiB, 512MiB, or GiB as a number)") from None
    if value < 0:
        raise ValueError(f"not a memory size: {text!r} (negative)")
    return int(value * factor)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def format_plan(
    geometry: ModelGeometry,
    request: PlanRequest,
    rows: list[ModeCapacity],
    header_lines: list[str],
) -> str:
    need = request.max_model_len * request.max_num_seqs
    lines = list(header_lines)
    lines.append(
        f"requested: {request.max_num_seqs} x {request.max_model_len:,} tokens "
        f"= {need:,} tokens of KV"
    )
    lines.append("")
    lines.append(
        f"{'mode':<22}{'B/tok/head':>11}{'x bf16':>8}{'block':>7}"
        f"{'blocks':>10}{'KV tokens':>14}{'max conc.':>11}  fits"
    )
    for row in rows:
        lines.append(
            f"{row.mode:<22}{row.bytes_per_token_per_head:>11}"
            f"{row.ratio_vs_bf16:>8.2f}{row.block_size:>7}{row.num_blocks:>10,}"
            f"{row.capacity_tokens:>14,}{row.max_concurrency:>11.2f}  "
            f"{'yes' if row.fits else 'NO'}"
        )
    return "\n".join(lines)


def plan_rows(
    geometry: ModelGeometry,
    request: PlanRequest,
    modes: tuple[str, ...] = KV_MODES,
    kvtc_slot_bytes: int | None = None,
) -> list[ModeCapacity]:
    if kvtc_slot_bytes is None:
        kvtc_slot_bytes = default_kvtc_slot_bytes(geometry.head_dim)
    return [mode_capacity(geometry, request, m, kvtc_slot_bytes) for m in modes]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_plan_arguments(parser: Any) -> None:
    """Arguments of `lnarize-serve plan` (an argparse parser)."""
    parser.add_argument(
        "--model",
        default="qwen3.6-27b",
        help="built-in name (qwen3.6-27b), a local model folder / config.json, "
        "or a Hugging Face repo id",
    )
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--gpu-memory", default="96GB", help="GPU memory, e.g. 96GB, 80GiB (default 96GB)"
    )
    memory.add_argument(
        "--kv-memory",
        default=None,
        help="KV cache memory itself (as VLLM_CPU_KVCACHE_SPACE or "
        "kv_cache_memory_bytes give it), e.g. 1GiB; skips the GPU arithmetic",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument(
        "--weights", default=None, help="weights size (default: from the model)"
    )
    parser.add_argument(
        "--overhead",
        default="4GiB",
        help="non-KV memory besides weights: activation peak, CUDA graphs, "
        "sampler (default 4GiB)",
    )
    parser.add_argument("--max-model-len", type=int, default=262144)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument(
        "--block-size", type=int, default=16, help="vLLM block size (GPU 16, CPU 128)"
    )
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument(
        "--kvtc-slot-bytes",
        type=int,
        default=None,
        help="KVTC bytes per token per KV head (default: K2V4 at the model's head_dim)",
    )
    parser.add_argument(
        "--modes", default=",".join(KV_MODES), help="comma-separated cache modes"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_plan(args: Any) -> int:
    """Print the plan (the "fits" column answers the question; exit 0); bad
    input is one line on stderr and exit 2."""
    import sys

    try:
        return _run_plan(args)
    except ValueError as exc:
        print(f"lnarize-serve plan: {exc}", file=sys.stderr)
        return 2


def _run_plan(args: Any) -> int:
    geometry = resolve_geometry(args.model)
    header = [f"model: {geometry.name}  ({geometry.source})"]
    drafts = geometry.attention_layers_allocated(args.num_speculative_tokens) - geometry.num_attention_layers
    header.append(
        f"full-attention layers: {geometry.num_attention_layers}"
        + (f" + {drafts} MTP draft" if drafts else "")
        + f", KV heads: "
        f"{geometry.num_kv_heads}, head_dim: {geometry.head_dim}"
        + (
            f"; linear-attention layers: {geometry.linear.num_layers} "
            f"(fixed state {geometry.linear.state_bytes_per_layer(args.num_speculative_tokens) / 2**20:.2f} MiB"
            " per layer per sequence)"
            if geometry.linear
            else ""
        )
    )
    if args.kv_memory:
        kv_bytes = parse_bytes(args.kv_memory)
        header.append(f"KV memory: {kv_bytes / GIB:.2f} GiB (given)")
    else:
        gpu = parse_bytes(args.gpu_memory)
        weights = parse_bytes(args.weights) if args.weights else geometry.weights_bytes
        if weights is None:
            raise SystemExit("plan: the model's weight size is unknown; pass --weights")
        overhead = parse_bytes(args.overhead)
        kv_bytes = kv_memory_from_gpu(
            gpu, args.gpu_memory_utilization, weights, overhead
        )
        header.append(
            f"GPU {gpu / GIB:.2f} GiB x {args.gpu_memory_utilization} - weights "
            f"{weights / GIB:.2f} GiB - overhead {overhead / GIB:.2f} GiB = KV memory "
            f"{kv_bytes / GIB:.2f} GiB"
        )
    request = PlanRequest(
        kv_memory_bytes=kv_bytes,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        kernel_block_alignment=args.block_size,
        num_speculative_tokens=args.num_speculative_tokens,
        prefix_caching=args.prefix_caching,
    )
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    rows = plan_rows(geometry, request, modes, args.kvtc_slot_bytes)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"kv_memory_bytes": kv_bytes, "rows": [asdict(r) for r in rows]}))
    else:
        print(format_plan(geometry, request, rows, header))
    return 0


def configure(parser: Any) -> None:
    """`lnarize-serve plan` (registered in cli.SUBCOMMANDS)."""
    add_plan_arguments(parser)
    parser.set_defaults(run=run_plan)
