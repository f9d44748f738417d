"""The cost model on packed streams and two levels: model bytes == measured bytes, exactly.

Bytes are deterministic, so every comparison is an equality, per rank, of the bytes sent and
received (forward + backward) that ``megatron_seqpar.comm.count_traffic`` counts:

- packed streams (``cu_seqlens``) at P = 2, 3, 4: every method x layout (contiguous, zigzag,
  balanced) x causal/bidirectional on a few packings (many short sequences beside a long one,
  one sequence, sequences shorter than a shard; contiguous and balanced also with lengths that
  are not multiples of 2P), LightSeq's contiguous schedule balanced and unbalanced, fp32 and
  bf16, GQA;
- two levels at P = 4 (U=2 x R=2 and U=4 x R=1): every method, both layouts, causal and
  bidirectional, K/V heads divisible by U and repeated, unpacked and packed: the inner level
  (the head all-to-alls, ``sent_by_kind["all_to_all"]``) equals ``inner_sent`` and the rest
  equals the outer method's bytes.
"""

from __future__ import annotations

import pytest

import megatron_seqpar as msp
from megatron_seqpar.cost import (
    AttnShape,
    attention_cost,
    packed_flop_ratio,
    packed_shape,
)

S_PER_RANK = 24  # local tokens: packings below are in units of 2P tokens (12 units in all)
UNITS = {"short+long": (1, 2, 1, 8), "one": (12,), "many": (1, 1, 1, 1, 3, 5)}


def _packings(P: int, layout: str):
    u = 2 * P
    out = {name: tuple(x * u for x in units) for name, units in UNITS.items()}
    if layout in ("contiguous", "balanced"):  # any lengths; sequences straddle ranks
        S = S_PER_RANK * P
        out["ragged"] = (5, 7, 1, S - 13)
    return out


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _cases(P: int):
    for method in msp.METHODS:
        for layout in ("contiguous", "zigzag", "balanced"):
            for causal in (True, False):
                for lengths in _packings(P, layout).values():
                    yield dict(method=method, layout=layout, causal=causal, lengths=lengths,
                               dtype="fp32", balance=True, U=1, hkv=2)
    for lengths in _packings(P, "contiguous").values():
        yield dict(method="lightseq", layout="contiguous", causal=True, lengths=lengths,
                   dtype="fp32", balance=False, U=1, hkv=2)
    yield dict(method="lightseq", layout="zigzag", causal=True, lengths=_packings(P, "zigzag")
               ["short+long"], dtype="bf16", balance=True, U=1, hkv=2)


def _two_level_cases(P: int):
    for U in (2, 4):
        for method in msp.METHODS:
            for layout in ("contiguous", "zigzag"):
                for causal in (True, False):
                    for hkv in (2, 1):  # 1: repeated to lcm(1, U) = U heads
                        yield dict(method=method, layout=layout, causal=causal, lengths=None,
                                   dtype="fp32", balance=True, U=U, hkv=hkv)
                yield dict(method=method, layout=layout, causal=True,
                           lengths=_packings(P, layout)["short+long"], dtype="bf16",
                           balance=True, U=U, hkv=2)
        yield dict(method="lightseq", layout="contiguous", causal=True, lengths=None,
                   dtype="fp32", balance=False, U=U, hkv=2)


def _all_cases(P: int):
    return list(_cases(P)) + (list(_two_level_cases(P)) if P == 4 else [])


def _measure(rank, world):
    import torch

    import megatron_seqpar as msp
    from megatron_seqpar.comm import count_traffic

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    b, s, hq, D = 2, S_PER_RANK, 4, 8
    out = []
    for c in _all_cases(world):
        g = torch.Generator().manual_seed(rank)
        dt = dtypes[c["dtype"]]
        q = torch.randn(b, s, hq, D, generator=g).to(dt).requires_grad_()
        k = torch.randn(b, s, c["hkv"], D, generator=g).to(dt).requires_grad_()
        v = torch.randn(b, s, c["hkv"], D, generator=g).to(dt).requires_grad_()
        kw = dict(head_parallel=c["U"])
        if c["method"] == "lightseq":
            kw["balance"] = c["balance"]
        opts = msp.method_options(c["method"])(**kw)
        cu = None if c["lengths"] is None else torch.tensor(_cu(c["lengths"]))
        with count_traffic() as t:  # the backward counts into the forward's Traffic
            o = msp.attention(q, k, v, method=c["method"], causal=c["causal"],
                              layout=c["layout"], options=opts, cu_seqlens=cu)
            o.backward(torch.ones_like(o))
        out.append((t.sent_bytes, t.recv_bytes, t.sent_by_kind["all_to_all"]))
    return out


def _model(c, P):
    kw = dict(b=2, hq=4, hkv=c["hkv"], D=8, dtype=c["dtype"], causal=c["causal"],
              layout=c["layout"], balance=c["balance"], head_parallel=c["U"])
    if c["lengths"] is None:
        return attention_cost(c["method"], AttnShape(S=S_PER_RANK * P, P=P, **kw))
    return attention_cost(c["method"], packed_shape(c["lengths"], P, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_packed_and_two_level_bytes_equal_model(world):
    from distributed import run_on_ranks

    per_rank = run_on_ranks(_measure, world, timeout=300)
    bad = []
    for i, c in enumerate(_all_cases(world)):
        cost = _model(c, world)
        for r in range(world):
            got = per_rank[r][i]
            want = (cost.sent[r], cost.recv[r], cost.inner_sent[r])
            if got != want:
                bad.append(f"{c} rank {r}: measured (sent, recv, inner) {got} model {want}")
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:20])


# ----------------------------------------------------------------------------- unit checks
def test_packed_pairs_follow_sum_of_squares():
    """Every pair inside a sequence is computed exactly once over the ranks; none across."""
    lengths = (64, 16, 256, 32, 96, 48)
    for P in (2, 4):
        for layout in ("contiguous", "zigzag"):
            for method in ("lightseq", "lss", "mqsp"):
                sh = packed_shape(lengths, P, layout=layout)
                assert sum(attention_cost(method, sh).pairs) == \
                    sum(n * (n + 1) // 2 for n in lengths), (P, layout, method)
    assert packed_flop_ratio([4, 4]) == (2 * 4 * 5) / (8 * 9)
    assert packed_flop_ratio([8], causal=False) == 1.0
    sh = packed_shape(lengths, 4, layout="zigzag")  # zigzag balances every sequence
    pairs = attention_cost("lightseq", sh).pairs
    assert max(pairs) - min(pairs) <= len(lengths) * sh.s


def test_lightseq_contiguous_packed_skips_transfers():
    """Sequences that never cross a rank boundary leave every transfer out (every method)."""
    P, s = 4, 64
    inside = packed_shape([s // 2] * (2 * P), P)  # two sequences per rank, none straddling
    assert attention_cost("lightseq", inside).sent == (0,) * P
    across = packed_shape([s // 2] + [s] * (P - 1) + [s // 2], P)  # each straddles two ranks
    sent = attention_cost("lightseq", across).sent_fwd
    kv = AttnShape(S=P * s, P=P).kv_bytes
    # only to the next rank, once, and only the straddling sequence's keys: the second half
    # of the shard (kernels.kv_range)
    assert sent == (kv,) * (P - 1) + (0,)
    # RSA's rings stop after the farthest chunk a rank needs and carry the part the others
    # read (rsa.ring_ranges): none inside; across one step, K and V of the shard's second
    # half, and nothing from the last rank, whose keys no other rank reads
    assert attention_cost("rsa", inside).sent == (0,) * P
    assert attention_cost("rsa", across).sent_fwd == (kv,) * (P - 1) + (0,)
    # LSS sends only the key range a receiver reads, like LightSeq: none inside, across the
    # second half of its K/V to the next rank (forward, and again in the backward; the dK/dV
    # partial of the previous rank's half home, fp32 like the inputs): the first rank has no
    # partial to return, the last no next rank
    assert attention_cost("lss", inside).sent == (0,) * P
    assert attention_cost("lss", across).sent == (2 * kv,) + (3 * kv,) * (P - 2) + (kv,)
    # MQSP's queries go only where they see keys: nowhere inside, to a neighbour across
    # (the exact bytes: test_packed_and_two_level_bytes_equal_model, measured)
    assert attention_cost("mqsp", inside).sent == (0,) * P
    dense = attention_cost("mqsp", AttnShape(S=P * s, P=P)).sent
    assert all(0 < x < d for x, d in zip(attention_cost("mqsp", across).sent, dense))


def test_two_level_bytes_per_level():
    """Inner: (U-1)/U of [Q, K', V'] and O forward, dO and [dQ, dK', dV'] backward; outer: the
    method over R ranks on U·s tokens with hq/U and h'/U heads."""
    sh = AttnShape(S=4096, P=8, b=1, hq=8, hkv=2, D=64, layout="zigzag", head_parallel=4)
    c = attention_cost("lightseq", sh)
    h2 = 4  # lcm(2, 4): K/V heads repeated twice
    e, a, s = 4, 4, 512
    qkv, o = s * (8 + 2 * h2) * 64, s * 8 * 64
    assert c.inner_sent == ((3 * (qkv * e + o * e) + 3 * (o * e + qkv * a)) // 4,) * 8
    R = 2
    outer_kv = 4 * s * (h2 // 4) * 64 * e  # U·s tokens, h'/U heads
    assert c.outer.shape.P == R and c.outer.shape.hq == 2
    # K/V out, K/V again in the backward and dK/dV partials home (fp32 = input dtype), each
    # only the part of the shard the other outer rank's blocks read (kernels.kv_range: outer
    # rank 0's queries read all of rank 1's keys, rank 1's only the first 7/8 of rank 0's)
    from megatron_seqpar.headpar import two_level_runs
    from megatron_seqpar.kernels import kv_range

    runs = [two_level_runs("zigzag", j, 8, 4, 4 * s) for j in range(R)]
    part = [[(lambda lo, hi: (hi - lo) / (4 * s))(*kv_range(runs[i], runs[j], True))
             for j in range(R)] for i in range(R)]
    assert part[0][1] == 1 and part[1][0] == 7 / 8
    want = [round(4 * outer_kv * part[1 - r][r] + 2 * outer_kv * part[r][1 - r]) for r in range(R)]
    assert c.outer_sent == tuple(want[r // 4] for r in range(8))
    one = attention_cost("lightseq", AttnShape(S=4096, P=8, b=1, hq=8, hkv=2, D=64,
                                               layout="zigzag"))
    assert max(c.outer_sent) < max(one.sent)
    # every CP rank of an inner group computes its outer rank's pairs for hq/U heads: U times
    # the pairs, the same FLOPs
    assert sum(c.pairs) == 4 * sum(one.pairs) and sum(c.flops) == sum(one.flops)
    with pytest.raises(ValueError, match="head_parallel"):
        AttnShape(S=4096, P=8, hq=6, hkv=2, head_parallel=4)


# ----------------------------------------------------------------------------- planner
def _plan():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import plan

    return plan


def test_planner_two_level_choices():
    """64 GPUs, 8 per node, network 9x slower than NVLink: a head split pays for every method at
    128K (communication-bound at U=1), Ulysses-only cannot split 32 heads over 64 ranks, and
    the flags name Megatron's hierarchical CP sizes."""
    from dataclasses import replace

    plan = _plan()
    m = plan.MODELS["llama-7b"]
    cl = replace(plan.CLUSTERS["h100-80g"], gpus=64, per_node=8, intra_gbps=450, inter_gbps=50)
    rows = plan.two_level_table(m, cl, [131072, 1048576], recompute="full")
    short, long_ = rows
    for meth in ("mqsp", "lss", "lightseq", "ring"):
        one, best = short["methods"][meth]
        assert best.head_parallel > 1 and best.step_s < 0.5 * one.step_s, meth
    assert short["ulysses"] is None and plan.ulysses_only(m, cl, 131072, P=32) is not None
    assert short["winner"].fits and short["winner"].head_parallel > 1
    # at 1M the attention compute hides most of the outer transfers: U buys less
    gain = lambda r, k: r["methods"][k][0].step_s / r["methods"][k][1].step_s
    assert gain(long_, "lightseq") < gain(short, "lightseq")
    assert plan.head_splits(m, 64) == [1, 2, 4, 8, 16, 32]
    assert "--hierarchical-context-parallel-sizes 8 8" in plan.flags("lightseq", 64, 1, 8)
    assert "a2a+p2p" in plan.flags("ring", 64, 1, 8)
    # one fast link everywhere: the inner level no longer has a faster link to use
    flat = replace(cl, per_node=64, inter_gbps=450)

    def saving(c):  # best-U time over U=1 time
        one, best = plan.two_level_row(m, c, 131072, "lightseq", P=64, recompute="full")
        return best.step_s / one.step_s

    assert saving(flat) > saving(cl)


# ----------------------------------------------------------------------------- memory
MEM_CASES = [*((m, 8) for m in msp.METHODS), ("lightseq", 2), ("lss", 2)]


def _measure_two_level_peak(rank, world, S, U):
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    from measure import measure

    import megatron_seqpar as msp

    out = []
    for method, hkv in MEM_CASES:
        peaks = []
        for _ in range(2):  # the lower of two: see the tolerance below
            g = torch.Generator().manual_seed(rank)
            q, do = (torch.randn(1, S // world, 8, 64, generator=g) for _ in range(2))
            k, v = (torch.randn(1, S // world, hkv, 64, generator=g).requires_grad_()
                    for _ in range(2))
            q.requires_grad_()
            opts = msp.method_options(method)(head_parallel=U)
            with measure(rank, world) as m:
                msp.attention(q, k, v, method=method, layout="zigzag", options=opts).backward(do)
            peaks.append(m.peak_bytes)
        out.append(min(peaks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("U", [2, 4])
def test_two_level_memory_within_tolerance_of_measured(U):
    """Peak allocation (profiler, fwd+bwd, beyond inputs) vs ``act_bytes`` at P=4, 512 tokens
    per rank, fp32, 8 heads (GQA 8/2 too).

    Tolerance -15%/+25%: wider than the single-level test's 10% because the peak of a
    two-level call sits at the last all-to-all, and which of the method's tensors autograd and
    the gloo threads have freed by then varies between runs: the same call measured 18.9 and
    22.0 MB (+17%) in two runs here, and every other case stayed within 0.92-1.07x.
    """
    from distributed import run_on_ranks

    P, S = 4, 2048
    per_rank = run_on_ranks(_measure_two_level_peak, P, S, U, timeout=300)
    bad = []
    for i, (method, hkv) in enumerate(MEM_CASES):
        model = attention_cost(method, AttnShape(S=S, P=P, hq=8, hkv=hkv, D=64, layout="zigzag",
                                                 head_parallel=U))
        got = max(r[i] for r in per_rank)
        if not 0.85 <= got / model.max_act_bytes <= 1.25:
            bad.append(f"{method} hkv={hkv}: measured {got} model {model.max_act_bytes} "
                       f"({got / model.max_act_bytes:.2f}x)")
    assert not bad, "\n".join(bad)


def test_planner_knows_the_packing_layout(capsys):
    """``tools/plan.py --packed-docs N``: each method on a packed stream in the zigzag and the
    balanced layout (``--seqpar-packing``). The busiest rank's attention pairs stay within 5%
    of the mean in both, and balanced LSS and LightSeq move at most half of zigzag's bytes
    per rank (only the split documents' keys travel)."""
    plan = _plan()
    rows = plan.print_packing(plan.MODELS["llama-7b"], plan.CLUSTERS["a100-80g"], 32768, 4, 64,
                              "lognormal")
    by = {(m, layout): (p, skew, sent) for m, layout, p, skew, sent in rows}
    assert {layout for _, layout in by} == {"zigzag", "balanced"} and len(by) == 8
    for (m, layout), (p, skew, _) in by.items():
        assert skew <= 1.05 and p.fits and p.layout == layout, (m, layout, skew)
    for m in ("lss", "lightseq"):
        assert by[m, "balanced"][2] <= 0.5 * by[m, "zigzag"][2], m
    assert "balanced" in capsys.readouterr().out
