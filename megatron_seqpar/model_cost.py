"""Whole-model cost for the planner (``tools/plan.py``): one transformer layer per rank, its
sequence-parallel attention (``megatron_seqpar.cost``) plus Megatron's tensor parallelism,
activation memory after Korthikanti et al. and activation recompute, and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_seqpar.cost import AttentionCost, AttnShape, attention_cost
from megatron_seqpar.registry import REGISTRY


@dataclass(frozen=True)
class ModelConfig:
    """A transformer stack: ``layers`` of attention (``heads`` query, ``kv_heads`` key/value
    heads) and an MLP of width ``ffn`` (``gated``: SwiGLU's three matrices)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    ffn: int | None = None
    vocab: int = 32000
    gated: bool = False
    causal: bool = True
    window: int = 0  # causal sliding window (window, 0) on every layer when > 0 (Mistral)

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide into heads, heads into kv_heads groups")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + 2 * h * self.kv_heads * d
        return attn + (3 if self.gated else 2) * h * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden


RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class LayerCost:
    """One transformer layer on one rank (forward + backward): bytes on the sequence axis and
    on the tensor-parallel axis, activation memory kept for the backward, and FLOPs."""

    attention: AttentionCost
    sp_bytes: int  # sequence-parallel attention traffic, the busiest rank
    tp_bytes: int  # Megatron TP (+ its sequence parallelism) traffic
    act_bytes: int  # activations this layer keeps until its backward
    peak_extra_bytes: int  # transient working set of the layer being (re)computed
    attn_flops: int  # busiest rank, forward + backward (+ recompute)
    linear_flops: int
    sp_inner_bytes: int = 0  # two levels: the head all-to-alls' share of sp_bytes


def layer_cost(model: ModelConfig, *, S: int, P: int, method: str, tp: int = 1, b: int = 1,
               dtype: str = "bf16", recompute: str = "none", layout: str | None = None,
               mqsp_budget_mb: float = 1024.0, flash: bool = True,
               head_parallel: int = 1, cu_seqlens: tuple[int, ...] | None = None) -> LayerCost:
    """Per-rank cost of one layer with sequence parallelism ``P`` and tensor parallelism ``tp``.

    Activations follow Korthikanti et al. (TP with sequence parallelism, flash attention so no
    ``s x s`` term): ``34·s·b·h/tp`` bytes for 16-bit (scaled by the element size), plus what the
    method holds beyond a local fused attention. ``full`` recompute keeps only the layer input
    (``2·s·b·h/tp``) and re-runs the forward; the rematerialization-aware checkpoint of the
    methods whose registry entry says ``remat`` (LightSeq, MQSP) keeps the attention output, so
    their recompute skips the distributed attention forward.
    ``selective`` recomputes the core attention only (free for fused kernels; for RSA it drops
    the kept score rows at the price of one more attention forward). ``flash=False`` models a
    pre-FlashAttention single-rank baseline (``P = 1``) that keeps its ``5·a·s²·b`` bytes of
    scores, softmax and dropout mask (Korthikanti et al.), as the 2021-2023 papers' TP
    baselines did unless they recompute attention selectively. ``head_parallel``: two levels
    (``two_level_cost``); ``sp_inner_bytes`` is then the head all-to-alls' share.
    ``cu_seqlens``: a packed stream of documents (``S`` = its last entry) in ``layout``
    (``zigzag``: every document a multiple of ``2P``; ``balanced``: ``megatron_seqpar.balance``);
    the attention's pairs and transfers are then the documents' only.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r}; use one of {RECOMPUTE}")
    if model.heads % tp:
        raise ValueError(f"tp={tp} must divide heads={model.heads}")
    hq, hkv = model.heads // tp, max(1, model.kv_heads // tp)
    # a causal window makes zigzag pointless (every query sees about `window` keys) and
    # contiguous shards then talk to their neighbours only
    zigzag = method not in ("ulysses", "allgather") and not model.window
    layout = layout or ("zigzag" if zigzag else "contiguous")
    window = (model.window, 0) if model.window else None
    sh = AttnShape(S=S, P=P, b=b, hq=hq, hkv=hkv, D=model.head_dim, dtype=dtype,
                   causal=model.causal, layout=layout, mqsp_budget_mb=mqsp_budget_mb,
                   head_parallel=head_parallel, window=window,
                   cu_seqlens=tuple(cu_seqlens) if cu_seqlens else None)
    att = attention_cost("nosp" if P == 1 else method, sh)
    local = attention_cost("nosp", AttnShape(S=sh.s, P=1, b=b, hq=hq, hkv=hkv, D=sh.D,
                                             dtype=dtype, causal=model.causal, window=window))
    e, s, h = sh.e, sh.s, model.hidden
    base = 34 * s * b * h * e // 2 // tp
    extra = max(0, att.max_act_bytes - local.max_act_bytes)
    if not flash and P == 1 and recompute != "selective":
        extra += 5 * hq * S * S * b * e // 2
    attn_fwd = max(att.flops_fwd)
    attn = max(att.flops)
    linear = 3 * 2 * b * s * model.layer_params // tp
    if recompute == "full":
        act, peak = 2 * s * b * h * e // tp, base + extra
        linear += linear // 3
        remat = method in REGISTRY and REGISTRY[method].remat  # keeps out + lse (LightSeq, MQSP)
        attn += 0 if remat else attn_fwd
    elif recompute == "selective" and method == "rsa":
        act, peak = base, extra
        attn += attn_fwd
    else:
        act, peak = base + extra, 0
    tp_bytes = 8 * (tp - 1) * s * b * h * e // tp
    busiest = max(range(P), key=lambda r: att.sent[r])
    return LayerCost(att, att.sent[busiest], tp_bytes, act, peak, attn, linear,
                     att.inner_sent[busiest])


@dataclass(frozen=True)
class GradReduceBytes:
    """Bytes one rank sends per step to reduce gradients (and, with a distributed optimizer,
    to gather the updated parameters back), by level."""

    level1: int  # over the sequence (CP) group
    level2: int  # over the pure data-parallel group
    param_gather: int = 0  # distributed optimizer: all-gather of updated parameters

    @property
    def total(self) -> int:
        return self.level1 + self.level2 + self.param_gather


def lss_grad_bytes(n: int, w: int, P: int, D: int, *, distributed_optimizer: bool = False,
                   w_param: int | None = None, position_elements: int = 0,
                   assemble: bool = True) -> GradReduceBytes:
    """LSS double averaging of ``n`` gradient elements of ``w`` bytes at CP=``P``, DP=``D``,
    with bandwidth-optimal ring collectives (all-reduce sends 2(k-1)/k of its payload,
    reduce-scatter and all-gather (k-1)/k):

    * DDP (``megatron.lss_grad``): level 1 all-reduces the whole buffer over CP (owned rows,
      ``assemble=False``: all but the ``position_elements``), level 2 DDP's all-reduce over DP;
    * distributed optimizer (one instance per DP replica, sharded over its CP group): level 1
      is the reduce-scatter over CP, level 2 the all-reduce of the 1/P shard over DP, then
      the updated parameters (``w_param`` bytes each) are all-gathered over CP.
    """
    if distributed_optimizer:
        wp = w if w_param is None else w_param
        return GradReduceBytes(level1=(P - 1) * n * w // P,
                               level2=2 * (D - 1) * (n // P) * w // D,
                               param_gather=(P - 1) * n * wp // P)
    n1 = n if assemble else n - position_elements
    return GradReduceBytes(level1=2 * (P - 1) * n1 * w // P, level2=2 * (D - 1) * n * w // D)
