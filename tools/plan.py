"""Planner: which sequence-parallel method, layout and sizes fit a model on a cluster.

    python tools/plan.py --model llama-7b --cluster a100-80g --gpus 16 --seqlen 131072
    python tools/plan.py --model custom --layers 24 --hidden 2048 --heads 16 --seqlen 65536
    python tools/plan.py --paper all        # the four papers' setups, predicted vs reported
    python tools/plan.py --two-level --model llama-7b --gpus 64 --per-node 8 \
        --intra-gbps 450 --inter-gbps 50 --seqlens 131072 262144 524288 1048576

For every method (ours and the baselines Ulysses / ring / Megatron TP) it predicts, from the
analytic model in ``megatron_seqpar.cost``: per-GPU memory, step time (compute at
``--efficiency`` of peak, sequence-axis traffic over the intra- or inter-node link, overlapped
with attention where the method overlaps), and the longest sequence that fits. It ranks them by
predicted step time and prints the Megatron-LM flags to run the winner.

``--two-level``: for every method (ours and ring) at every head-parallel split ``U`` (inner head
all-to-all over ``U`` consecutive ranks, over NVLink while ``U·tp`` GPUs fit in a node; the
method over the ``R = P/U`` groups, across nodes once ``P·tp`` GPUs do not), the predicted step
time at ``U = 1``, the best ``U`` and its time, beside Ulysses-only (``U = P``; possible only
while the K/V heads divide over ``P``) and ring-only; the winner per sequence length.

The model is a first-order one: use it to choose, not to promise. Where a paper's exact setup is
not public (micro-batch, GPU memory variant), the preset says what it assumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_seqpar import METHODS  # noqa: E402
from megatron_seqpar.model_cost import RECOMPUTE, ModelConfig, layer_cost  # noqa: E402

MODELS = {
    "bert-base": ModelConfig("bert-base", 12, 768, 12, vocab=30522, causal=False),
    "bert-large": ModelConfig("bert-large", 24, 1024, 16, vocab=30522, causal=False),
    "gpt2": ModelConfig("gpt2", 12, 768, 12, vocab=50257),
    "gpt2-medium": ModelConfig("gpt2-medium", 24, 1024, 16, vocab=50257),
    "gpt2-large": ModelConfig("gpt2-large", 36, 1280, 20, vocab=50257),
    "gpt2-xl": ModelConfig("gpt2-xl", 48, 1600, 25, vocab=50257),
    "llama-7b": ModelConfig("llama-7b", 32, 4096, 32, ffn=11008, gated=True, vocab=32000),
}


@dataclass(frozen=True)
class Cluster:
    """GPUs: memory (GiB), count, per node, link bandwidths (GB/s per GPU), dense peak."""

    name: str
    mem_gb: float
    gpus: int
    per_node: int
    intra_gbps: float
    inter_gbps: float
    peak_tflops: float

    def __post_init__(self):
        if min(self.mem_gb, self.gpus, self.per_node, self.intra_gbps, self.inter_gbps,
               self.peak_tflops) <= 0:
            raise ValueError("cluster figures must be positive")

    def bandwidth(self, group: int) -> float:
        return (self.intra_gbps if group <= self.per_node else self.inter_gbps) * 1e9


CLUSTERS = {
    "p100-16g": Cluster("p100-16g", 16, 64, 4, 20, 6.25, 18.7),
    "v100-16g": Cluster("v100-16g", 16, 144, 6, 50, 12.5, 125),
    "v100-32g": Cluster("v100-32g", 32, 16, 8, 130, 12.5, 125),
    "a100-40g": Cluster("a100-40g", 40, 32, 8, 250, 25, 312),
    "a100-80g": Cluster("a100-80g", 80, 16, 8, 250, 25, 312),
    "h100-80g": Cluster("h100-80g", 80, 16, 8, 450, 50, 989),
}
OVERLAPPED = {"lightseq", "ring", "rsa"}  # post the next transfer before computing


@dataclass(frozen=True)
class Plan:
    method: str
    layout: str
    P: int
    tp: int
    S: int
    mem_gb: float
    step_s: float
    fits: bool
    head_parallel: int = 1
    attention: Any = field(default=None, compare=False, repr=False)  # cost.AttentionCost


def predict(model: ModelConfig, cl: Cluster, *, method: str, S: int, P: int, tp: int,
            layout: str | None = None, b: int = 1, dtype: str = "bf16",
            recompute: str = "full", efficiency: float = 0.5, flash: bool = True,
            head_parallel: int = 1, cu_seqlens: tuple[int, ...] | None = None) -> Plan:
    """Memory (GiB per GPU) and step time (s) of one micro-batch on ``P x tp`` GPUs.

    ``method="megatron"`` is Megatron TP + sequence parallelism with ``P = 1`` (the baseline
    the papers compare with); ``"nosp"`` one rank per sequence. Static memory: Megatron's
    distributed optimizer over the ``P`` ranks (16-bit weights, fp32 gradients, and 12 bytes of
    fp32 master weights and Adam moments per parameter sharded ``P`` ways), divided by ``tp``.
    ``head_parallel = U``: two levels; the inner all-to-alls (over ``U·tp`` GPUs, blocking) and
    the outer method's transfers (over ``P·tp`` GPUs) each take their own link's bandwidth.
    ``cu_seqlens``: a packed stream of documents (``layer_cost``'s).
    """
    meth = "nosp" if method in ("megatron", "nosp") else method
    lc = layer_cost(model, S=S, P=P, method=meth, tp=tp, b=b, dtype=dtype,
                    recompute=recompute, layout=layout, flash=flash, head_parallel=head_parallel,
                    cu_seqlens=cu_seqlens)
    static = model.params * (6 + 12 / P) / tp
    logits = b * (S // P) * model.vocab * 4 / tp * 2  # fp32 logits and their gradient
    mem = static + model.layers * lc.act_bytes + lc.peak_extra_bytes + logits
    flop_s = cl.peak_tflops * 1e12 * efficiency
    t_attn = lc.attn_flops / flop_s
    t_lin = lc.linear_flops / flop_s
    outer_bytes = lc.sp_bytes - lc.sp_inner_bytes
    t_sp = outer_bytes / cl.bandwidth(P * tp) if P > 1 else 0.0
    t_in = lc.sp_inner_bytes / cl.bandwidth(head_parallel * tp) if head_parallel > 1 else 0.0
    if recompute == "full" and method != "lightseq":
        t_sp *= 1.5  # the recomputed forward sends again (LightSeq's checkpoint avoids it)
        t_in *= 1.5
    t_tp = lc.tp_bytes / cl.bandwidth(tp) if tp > 1 else 0.0
    t_layer = t_lin + t_tp + t_in + (max(t_attn, t_sp) if meth in OVERLAPPED else t_attn + t_sp)
    head = 3 * 2 * b * (S // P) * model.hidden * model.vocab / tp / flop_s
    return Plan(method, lc.attention.shape.layout, P, tp, S, mem / 2**30,
                model.layers * t_layer + head, mem <= cl.mem_gb * 2**30 * 0.9, head_parallel,
                lc.attention)


def max_seqlen(model, cl, *, method, P, tp, step=None, **kw) -> int:
    """Longest S (a multiple of ``step``) whose predicted memory fits 90% of the GPU."""
    step = step or 2 * P * 64
    fits = lambda S: predict(model, cl, method=method, S=S, P=P, tp=tp, **kw).fits
    if not fits(step):
        return 0
    lo, hi = 1, 2
    while fits(hi * step) and hi < 2**16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def candidates(model: ModelConfig, gpus: int):
    """(method, P, tp, layout) worth ranking on ``gpus`` GPUs for one sequence (with a
    sliding window our methods run contiguous: every query sees about the window's keys, and
    contiguous shards talk to their neighbours only)."""
    tps = [t for t in (1, 2, 4, 8) if model.heads % t == 0 and t <= gpus]
    ours = "contiguous" if model.window else "zigzag"
    for tp in tps:
        P = gpus // tp
        if P > 1:
            for m in METHODS:
                yield m, P, tp, ours
            if not model.window:
                yield "lightseq", P, tp, "contiguous"
            yield "ring", P, tp, "zigzag"
            if (model.kv_heads // tp) % P == 0:
                yield "ulysses", P, tp, "contiguous"
    if model.heads % gpus == 0 or gpus <= max(tps):
        yield "megatron", 1, min(gpus, max(tps)), "contiguous"


def flags(method: str, P: int, tp: int, head_parallel: int = 1) -> str:
    base = f"--tensor-model-parallel-size {tp} --sequence-parallel" if tp > 1 else ""
    U = head_parallel
    two = f" --hierarchical-context-parallel-sizes {U} {P // U}" if U > 1 else ""
    if method in METHODS:
        return f"{base} --context-parallel-size {P} --seqpar-method {method}{two}".strip()
    if method == "ring" and U > 1:
        return f"{base} --context-parallel-size {P} --cp-comm-type a2a+p2p{two}".strip()
    if method == "ring":
        return f"{base} --context-parallel-size {P} --cp-comm-type p2p".strip()
    if method == "ulysses":
        return f"{base} --context-parallel-size {P} --cp-comm-type a2a".strip()
    return base or "(no model parallelism)"


def rank_table(model, cl, S: int, **kw) -> list[tuple[Plan, int]]:
    rows = []
    for m, P, tp, layout in candidates(model, cl.gpus):
        if S % (2 * P):
            continue
        plan = predict(model, cl, method=m, S=S, P=P, tp=tp, layout=layout, **kw)
        rows.append((plan, max_seqlen(model, cl, method=m, P=P, tp=tp, layout=layout, **kw)))
    rows.sort(key=lambda r: (not r[0].fits, r[0].step_s))
    return rows


def print_ranking(model, cl, S, **kw) -> None:
    rows = rank_table(model, cl, S, **kw)
    print(f"\n{model.name} on {cl.gpus} x {cl.name}, S={S}, recompute={kw.get('recompute')}")
    print(f"{'method':>10} {'layout':>10} {'P':>4} {'tp':>3} {'GiB/GPU':>8} {'fits':>5} "
          f"{'step s':>8} {'max S':>9}  flags")
    for plan, smax in rows:
        print(f"{plan.method:>10} {plan.layout:>10} {plan.P:>4} {plan.tp:>3} "
              f"{plan.mem_gb:>8.1f} {str(plan.fits):>5} {plan.step_s:>8.3f} {smax:>9}  "
              f"{flags(plan.method, plan.P, plan.tp)}")


# ----------------------------------------------------------------------------- two levels
TWO_LEVEL_METHODS = (*METHODS, "ring")


def head_splits(model: ModelConfig, P: int, tp: int = 1) -> list[int]:
    """Every ``U`` that divides ``P`` and the query heads per TP rank."""
    return [U for U in range(1, P + 1) if P % U == 0 and (model.heads // tp) % U == 0]


def two_level_row(model, cl, S: int, method: str, *, P: int, tp: int = 1, **kw):
    """``(plan at U=1, best plan over U)`` for one method (best: the fastest that fits)."""
    plans = [predict(model, cl, method=method, S=S, P=P, tp=tp, layout="zigzag",
                     head_parallel=U, **kw) for U in head_splits(model, P, tp)]
    best = min(plans, key=lambda p: (not p.fits, p.step_s))
    return plans[0], best


def ulysses_only(model, cl, S: int, *, P: int, tp: int = 1, **kw) -> Plan | None:
    """Ulysses over all ``P`` ranks, or None where the K/V heads do not divide over ``P``."""
    if (model.kv_heads // tp) % P:
        return None
    return predict(model, cl, method="ulysses", S=S, P=P, tp=tp, layout="contiguous", **kw)


def two_level_table(model, cl, seqlens, *, tp: int = 1, **kw) -> list[dict]:
    """Per sequence length: every method at U=1 and at its best U, Ulysses-only, ring-only and
    the winner (the fastest plan that fits)."""
    P = cl.gpus // tp
    rows = []
    for S in seqlens:
        row: dict = {"S": S, "methods": {}}
        cands = []
        for m in TWO_LEVEL_METHODS:
            one, best = two_level_row(model, cl, S, m, P=P, tp=tp, **kw)
            row["methods"][m] = (one, best)
            cands += [one, best]
        uly = ulysses_only(model, cl, S, P=P, tp=tp, **kw)
        row["ulysses"] = uly
        cands += [uly] if uly is not None else []
        win = min(cands, key=lambda p: (not p.fits, p.step_s))
        row["winner"] = win
        rows.append(row)
    return rows


def _cell(p: Plan | None) -> str:
    if p is None:
        return "n/a"
    return f"{p.step_s:.3g}" + ("" if p.fits else " (OOM)")


def print_two_level(model, cl, seqlens, *, tp: int = 1, **kw) -> None:
    """A markdown table: step time (s) per method at U=1 and at its best U."""
    rows = two_level_table(model, cl, seqlens, tp=tp, **kw)
    P = cl.gpus // tp
    print(f"\n{model.name}, {cl.gpus} GPUs ({cl.per_node} per node, {cl.intra_gbps:g} GB/s "
          f"intra, {cl.inter_gbps:g} GB/s inter, {cl.peak_tflops:g} TFLOP/s at "
          f"{kw.get('efficiency', 0.5):g}), tp={tp}, P={P}, recompute={kw.get('recompute')}: "
          "predicted step time (s), one sequence")
    heads = ["S"] + [f"{m} U=1 / best U" for m in TWO_LEVEL_METHODS] + ["Ulysses-only", "winner"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        cells = [f"{r['S'] // 1024}K"]
        for m in TWO_LEVEL_METHODS:
            one, best = r["methods"][m]
            cells.append(f"{_cell(one)} / {_cell(best)} (U={best.head_parallel})")
        cells.append(_cell(r["ulysses"]) if r["ulysses"] is not None else
                     f"n/a ({model.kv_heads // tp} kv heads < P={P})")
        w = r["winner"]
        cells.append(f"{w.method} U={w.head_parallel}")
        print("| " + " | ".join(cells) + " |")
    print("(ring at U=1 = ring-only; ring at U>1 = Ulysses x ring, Megatron's a2a+p2p; flags: "
          f"{flags(rows[-1]['winner'].method, P, tp, rows[-1]['winner'].head_parallel)})")


# ----------------------------------------------------------------------------- paper presets
def paper_presets(efficiency: float) -> list[tuple[str, str, str]]:
    """(claim, predicted, reported) for the four papers' headline figures."""
    out = []
    kw = dict(efficiency=efficiency)
    # RSA: BERT on 64 P100 (16 GB), sequence parallelism vs tensor parallelism; TP cannot exceed
    # the 12 heads of BERT-base, so TP is taken at 4 per node (assumption), RSA at P=64. The
    # 2021 baselines keep their attention scores (no FlashAttention): flash=False.
    m, cl = MODELS["bert-base"], CLUSTERS["p100-16g"]
    rs = max_seqlen(m, cl, method="rsa", P=64, tp=1, dtype="fp16", recompute="none", step=128,
                    **kw)
    ts = max_seqlen(m, cl, method="megatron", P=1, tp=4, dtype="fp16", recompute="none",
                    step=128, flash=False, **kw)
    out.append(("RSA BERT-base 64xP100: max seq length vs TP", f"{rs / max(ts, 1):.1f}x "
                f"({rs} vs {ts})", "3.0x"))
    rb = _max_batch(m, cl, "rsa", 64, 1, 512, **kw)
    tb = _max_batch(m, cl, "megatron", 1, 4, 512, flash=False, **kw)
    out.append(("RSA BERT-base 64xP100: max batch at S=512 vs TP",
                f"{rb / max(tb, 1):.1f}x ({rb} vs {tb})", "13.7x"))
    # MQSP: BERT-large on 32 A100 (40 GB assumed).
    m, cl = MODELS["bert-large"], CLUSTERS["a100-40g"]
    mq = max_seqlen(m, cl, method="mqsp", P=32, tp=1, dtype="fp16", recompute="none", step=512,
                    **kw)
    co = max_seqlen(m, cl, method="rsa", P=32, tp=1, dtype="fp16", recompute="none", step=512,
                    **kw)
    mg = max_seqlen(m, cl, method="megatron", P=1, tp=16, dtype="fp16", recompute="selective",
                    step=512, **kw)
    out.append(("MQSP BERT-large 32xA100: max tokens", f"{mq}", "78,848"))
    out.append(("MQSP vs ColossalAI SP (RSA) length", f"{mq / max(co, 1):.1f}x", "4.5x"))
    out.append(("MQSP vs Megatron-LM3 (TP16+SP) length", f"{mq / max(mg, 1):.1f}x", "4.3x"))
    # LSS: GPT-2-small-like on enwik8 (assumed), 144 V100, vs Nvidia SP (TP+SP, TP <= 12 heads)
    m, cl = MODELS["gpt2"], CLUSTERS["v100-16g"]
    S = 144 * 2 * 64
    ls = predict(m, cl, method="lss", S=S, P=144, tp=1, dtype="fp16", recompute="none", **kw)
    nv = predict(m, cl, method="megatron", S=S, P=1, tp=12, dtype="fp16", recompute="none",
                 flash=False, **kw)
    out.append((f"LSS 144xV100 GPT-2-small S={S}: speed vs Nvidia SP (TP12)",
                f"{nv.step_s / ls.step_s:.1f}x (x{144 // 12} GPUs for LSS)", "5.6x"))
    out.append((f"LSS 144xV100 S={S}: memory vs Nvidia SP",
                f"{nv.mem_gb / ls.mem_gb:.1f}x", "10.2x"))
    big = replace(cl, gpus=3456)
    lmax = max_seqlen(m, big, method="lss", P=3456 // 6, tp=1, dtype="fp16", recompute="none",
                      step=2 * 576 * 8, **kw)
    out.append(("LSS 3456xV100 (576-way SP x 6 DP assumed): max tokens", f"{lmax}", "50,112"))
    # LightSeq: Llama-7B, 16 A100-80G (2 nodes), vs Megatron-LM TP=16 across nodes
    m, cl = MODELS["llama-7b"], CLUSTERS["a100-80g"]
    sp = []
    for S in (32768, 65536, 131072, 262144, 524288):
        a = predict(m, cl, method="lightseq", S=S, P=16, tp=1, **kw)
        b = predict(m, cl, method="megatron", S=S, P=1, tp=16, **kw) \
            if m.heads % 16 == 0 else None
        if b is not None:
            sp.append(f"{S // 1024}K:{b.step_s / a.step_s:.2f}x")
    out.append(("LightSeq Llama-7B 16xA100 vs Megatron-LM (TP16)", " ".join(sp), "1.24-2.01x"))
    return out


def _max_batch(model, cl, method, P, tp, S, **kw) -> int:
    b = 0
    while b < 4096 and predict(model, cl, method=method, S=S, P=P, tp=tp, b=b + 1,
                               dtype="fp16", recompute="none", **kw).fits:
        b += 1
    return b


def print_packing(model: ModelConfig, cl: Cluster, S: int, P: int, docs: int, kind: str,
                  **kw) -> list[tuple[str, str, Plan, float, int]]:
    """Each method on a packed stream of ``docs`` documents (``bench_attention.doc_lengths``
    of ``kind``: multiples of ``2P``, so zigzag needs no padding) in the zigzag and balanced
    layouts: predicted step time, GiB per GPU, the busiest rank's attention pairs over the
    mean, and bytes per rank and layer. Returns the rows."""
    from bench_attention import doc_lengths

    cu = [0]
    for n in doc_lengths(S, docs, 2 * P, kind=kind):
        cu.append(cu[-1] + n)
    rows = []
    print(f"{model.name}, S={S} as {docs} {kind} documents, P={P}")
    print(f"{'method':>10} {'layout':>9} {'step s':>8} {'GiB/GPU':>8} {'busiest/mean':>13} "
          f"{'MB/rank/layer':>14}")
    for method in ("rsa", "mqsp", "lss", "lightseq"):
        for layout in ("zigzag", "balanced"):
            plan = predict(model, cl, method=method, S=S, P=P, tp=1, layout=layout,
                           cu_seqlens=tuple(cu), **kw)
            att = plan.attention  # the layer's attention cost the prediction used
            skew = max(att.flops) / (sum(att.flops) / P)
            sent = max(att.sent)
            rows.append((method, layout, plan, skew, sent))
            print(f"{method:>10} {layout:>9} {plan.step_s:8.3f} {plan.mem_gb:8.1f} "
                  f"{skew:13.3f} {sent / 2**20:14.1f}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=[*MODELS, "custom"], default="llama-7b")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--window", type=int, default=0,
                   help="causal sliding window on every layer (e.g. 4096, Mistral): pairs and "
                        "transfers outside it are not counted; the layout becomes contiguous")
    p.add_argument("--cluster", choices=sorted(CLUSTERS), default="a100-80g")
    p.add_argument("--gpus", type=int, help="GPUs for one sequence (default: the preset's)")
    p.add_argument("--gpu-mem-gb", type=float)
    p.add_argument("--intra-gbps", type=float)
    p.add_argument("--inter-gbps", type=float)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--per-node", type=int, help="GPUs per node (default: the preset's)")
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--seqlens", type=int, nargs="+", help="--two-level: lengths to tabulate")
    p.add_argument("--tp", type=int, default=1, help="--two-level: tensor parallelism")
    p.add_argument("--two-level", action="store_true",
                   help="each method at U=1 vs its best head-parallel U, Ulysses-only, ring-only")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--recompute", choices=RECOMPUTE, default="full")
    p.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak reached")
    p.add_argument("--paper", choices=[*METHODS, "all"], help="a method's paper, or all")
    p.add_argument("--packed-docs", type=int, default=0,
                   help="the seqlen as a packed stream of this many documents: each method in "
                   "the zigzag and balanced layouts (--seqpar-packing)")
    p.add_argument("--doc-lengths", choices=("lognormal", "uniform", "corpus"),
                   default="lognormal")
    p.add_argument("--cp", type=int, default=8, help="--packed-docs: the CP size")
    a = p.parse_args(argv)
    if a.paper:
        print(f"{'claim':<62} {'predicted':>28} {'reported':>12}")
        for claim, pred, rep in paper_presets(a.efficiency):
            if a.paper == "all" or claim.lower().startswith(a.paper):
                print(f"{claim:<62} {pred:>28} {rep:>12}")
        return
    if a.model == "custom":
        if not (a.layers and a.hidden and a.heads):
            p.error("--model custom needs --layers, --hidden and --heads")
        model = ModelConfig("custom", a.layers, a.hidden, a.heads, a.kv_heads, a.ffn,
                            a.vocab, causal=not a.bidirectional)
    else:
        model = MODELS[a.model]
    if a.window:
        model = replace(model, name=f"{model.name}+w{a.window}", window=a.window)
    cl = CLUSTERS[a.cluster]
    over = {k: v for k, v in dict(gpus=a.gpus, mem_gb=a.gpu_mem_gb, intra_gbps=a.intra_gbps,
                                  inter_gbps=a.inter_gbps, peak_tflops=a.peak_tflops,
                                  per_node=a.per_node).items()
            if v is not None}
    cl = replace(cl, **over)
    if a.packed_docs:
        print_packing(model, cl, a.seqlen, a.cp, a.packed_docs, a.doc_lengths, b=a.batch,
                      dtype=a.dtype, recompute=a.recompute, efficiency=a.efficiency)
        return
    if a.two_level:
        print_two_level(model, cl, a.seqlens or [a.seqlen], tp=a.tp, b=a.batch, dtype=a.dtype,
                        recompute=a.recompute, efficiency=a.efficiency)
        return
    print_ranking(model, cl, a.seqlen, b=a.batch, dtype=a.dtype, recompute=a.recompute,
                  efficiency=a.efficiency)


if __name__ == "__main__":
    main()
