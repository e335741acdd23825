"""Quality per byte of KV-cache methods on a real model, compressed-context decode.

For each held-out sequence of ``context + continuation`` tokens, the context
is prefilled once, exactly (one chunk, attending to the K/V in hand); then,
per method, the continuation runs over that cache and every
continuation position attends to the *stored* (compressed) K/V of all earlier
tokens, except the tokens the cache keeps exact (sinks, a recent window) and
itself (the current decode step's K/V are in hand). Continuation tokens are
teacher-forced, so every method scores the same tokens.

Metrics over continuation positions, against the uncompressed fp32 run:
next-token KL, top-1 agreement, continuation perplexity delta, and per-layer
relative error of the attention output (vs exact attention on the same
inputs of that layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lnarize_serve.kvtc_tools.baselines import KVMethod
from lnarize_serve.kvtc_tools.hf_hooks import attention_override


@dataclass(frozen=True)
class ExactTokens:
    """Which stored tokens a continuation query sees uncompressed."""

    sinks: int = 0    # first positions of the sequence
    window: int = 0   # most recent positions before the current token

    @property
    def label(self) -> str:
        return f"sinks {self.sinks}, window {self.window}"


@dataclass
class MethodResult:
    name: str
    bytes_per_token_head: float
    exact: ExactTokens
    kl: float
    top1: float
    ppl: float
    ppl_ref: float
    layer_rel_error: dict[int, float] = field(default_factory=dict)

    @property
    def ppl_delta(self) -> float:
        return self.ppl / self.ppl_ref - 1.0


class CompressedContextAttention:
    """Attention function implementing the cache's view for one method."""

    def __init__(self, method: KVMethod | None, context_len: int, exact: ExactTokens):
        self.method = method
        self.context_len = context_len
        self.exact = exact
        self.err_sq: dict[int, float] = {}
        self.ref_sq: dict[int, float] = {}

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, scaling: float | None = None, **kwargs: Any):
        layer = int(module.layer_idx)
        batch, num_q_heads, num_queries, head_dim = query.shape
        num_kv_heads, num_keys = key.shape[1], key.shape[2]
        group = num_q_heads // num_kv_heads
        scale = scaling if scaling is not None else head_dim ** -0.5
        q = query.float().view(batch, num_kv_heads, group, num_queries, head_dim)
        k, v = key.float(), value.float()
        # queries are the last num_queries positions (a cache may hold the rest)
        q_pos = num_keys - num_queries + torch.arange(num_queries, device=query.device)
        k_pos = torch.arange(num_keys, device=query.device)
        i, j = q_pos[:, None], k_pos[None, :]
        causal = j <= i
        exact_scores = torch.einsum("bhgid,bhjd->bhgij", q, k) * scale
        probs_exact = torch.softmax(exact_scores.masked_fill(~causal, float("-inf")), dim=-1)
        out_exact = torch.einsum("bhgij,bhjd->bhgid", probs_exact, v)
        if self.method is None:
            out = out_exact
        else:
            k_c, v_c = self.method.transform(layer, k, v)
            keep_exact = ((i < self.context_len) | (j < self.exact.sinks)
                          | (j >= i - self.exact.window))
            scores = torch.where(keep_exact, exact_scores,
                                 torch.einsum("bhgid,bhjd->bhgij", q, k_c.float()) * scale)
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out = (torch.einsum("bhgij,bhjd->bhgid", probs * keep_exact, v)
                   + torch.einsum("bhgij,bhjd->bhgid", probs * ~keep_exact, v_c.float()))
            scored = q_pos >= self.context_len
            diff = (out[..., scored, :] - out_exact[..., scored, :]).pow(2).sum().item()
            self.err_sq[layer] = self.err_sq.get(layer, 0.0) + diff
            self.ref_sq[layer] = (self.ref_sq.get(layer, 0.0)
                                  + out_exact[..., scored, :].pow(2).sum().item())
        out = out.reshape(batch, num_q_heads, num_queries, head_dim).transpose(1, 2).contiguous()
        return out.to(query.dtype), None


@torch.no_grad()
def prefill_context(model: Any, tokens: torch.Tensor, context_len: int) -> Any:
    """Exact prefill of the context (what every method shares): its KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=tokens[None, :context_len], past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def continuation_logits(model: Any, tokens: torch.Tensor, cache: Any, method: KVMethod | None,
                        context_len: int, exact: ExactTokens
                        ) -> tuple[torch.Tensor, CompressedContextAttention]:
    """Logits [T_cont - 1, V] at continuation positions context_len..end-2,
    the context's K/V taken from ``cache`` (restored to the context after)."""
    handler = CompressedContextAttention(method, context_len, exact)
    with attention_override(model, handler):
        logits = model(input_ids=tokens[None, context_len:], past_key_values=cache,
                       use_cache=True).logits[0]
    cache.crop(context_len - tokens.shape[0])  # drop the continuation again
    return logits[:-1].float(), handler


@torch.no_grad()
def evaluate_methods(model: Any, sequences: list[list[int]], context_len: int,
                     methods: list[tuple[KVMethod, ExactTokens]],
                     progress: Any = None) -> list[MethodResult]:
    """Score every (method, exact-token policy) on every sequence."""
    device = next(model.parameters()).device
    stats = [dict(kl=0.0, top1=0.0, nll=0.0, err={}, ref={}) for _ in methods]
    ref_nll, count = 0.0, 0
    for sequence in sequences:
        tokens = torch.tensor(sequence, device=device)
        targets = tokens[context_len + 1:]
        cache = prefill_context(model, tokens, context_len)
        ref_logits, _ = continuation_logits(model, tokens, cache, None, context_len, ExactTokens())
        ref_logp = F.log_softmax(ref_logits, dim=-1)
        ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
        ref_top = ref_logp.argmax(-1)
        count += targets.numel()
        for slot, (method, exact) in zip(stats, methods):
            logits, handler = continuation_logits(model, tokens, cache, method, context_len, exact)
            logp = F.log_softmax(logits, dim=-1)
            slot["kl"] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            slot["top1"] += (logp.argmax(-1) == ref_top).sum().item()
            slot["nll"] += F.nll_loss(logp, targets, reduction="sum").item()
            for layer, value in handler.err_sq.items():
                slot["err"][layer] = slot["err"].get(layer, 0.0) + value
                slot["ref"][layer] = slot["ref"].get(layer, 0.0) + handler.ref_sq[layer]
            if progress is not None:
                progress(method.name, exact)
    ppl_ref = math.exp(ref_nll / count)
    results = []
    for slot, (method, exact) in zip(stats, methods):
        rel = {layer: math.sqrt(slot["err"][layer] / max(slot["ref"][layer], 1e-30))
               for layer in sorted(slot["err"])}
        results.append(MethodResult(method.name, method.bytes_per_token_head, exact,
                                    kl=slot["kl"] / count, top1=slot["top1"] / count,
                                    ppl=math.exp(slot["nll"] / count), ppl_ref=ppl_ref,
                                    layer_rel_error=rel))
    return results


def format_table(results: list[MethodResult], bf16_bytes: float) -> str:
    header = ("| method | exact tokens | bytes/token/KV head | x vs bf16 | next-token KL | top-1 | "
              "ppl delta | attn-out rel err (mean / max over layers) |")
    lines = [header, "|" + "---|" * 8]
    for r in results:
        errs = list(r.layer_rel_error.values())
        err = f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}" if errs else "-"
        lines.append(f"| {r.name} | {r.exact.label} | {r.bytes_per_token_head:g} | "
                     f"{bf16_bytes / r.bytes_per_token_head:.2f} | {r.kl:.4f} | {r.top1:.3f} | "
                     f"{100 * r.ppl_delta:+.2f}% | {err} |")
    return "\n".join(lines)


def save_plot(results: list[MethodResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        marker = "o" if r.name.startswith("KVTC") else "s"
        for ax, value in ((axes[0], max(r.kl, 1e-5)), (axes[1], 100 * r.ppl_delta)):
            ax.scatter(r.bytes_per_token_head, value, marker=marker)
            ax.annotate(f"{r.name} ({r.exact.sinks}/{r.exact.window})",
                        (r.bytes_per_token_head, value), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("next-token KL vs fp32 (log)")
    axes[1].set_ylabel("continuation perplexity delta (%)")
    axes[1].axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("bytes per token per KV head (K+V)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
