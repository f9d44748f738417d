"""Method options, lower precisions, and the LightSeq schedule's block counts."""

import pytest
import torch
from distributed import run_on_ranks
from test_attention_exact import RTOL, run_case

import megatron_seqpar as msp
from megatron_seqpar.comm import count_traffic
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS
from megatron_seqpar.lightseq import schedule


def variant(rank, world, method, layout, options, causal=True, pad=True):
    return run_case(method, layout, causal, 8, 2, 16, pad, torch.float64, seed=7,
                    options=options)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", SEQUENCE_LAYOUTS)
def test_mqsp_micro_q_exact(world, layout):
    # 12 local tokens in 3 micro-chunks of 4: chunk 1 straddles the two zigzag halves
    opts = msp.method_options("mqsp")(micro_q=3)
    for errs in run_on_ranks(variant, world, "mqsp", layout, opts):
        assert max(errs) < RTOL, errs


def test_mqsp_budget_picks_micro_chunks():
    from megatron_seqpar.mqsp import Options, micro_chunks

    # score block (S/m)·s·b·hq·4 bytes: S=8192 over 2 ranks, b=1, hq=8 -> 1 GiB at m=1
    assert micro_chunks(Options(memory_budget_mb=256), b=1, hq=8, s=4096, world_size=2,
                        itemsize=4) == 4
    # the default budget (1 GiB) at S=16K over 2 ranks: m=4, not the 16 of 256 MiB
    assert micro_chunks(Options(), b=1, hq=8, s=8192, world_size=2, itemsize=4) == 4
    # small blocks: at least max(P, 4) chunks, so the gathered S/m queries are no more than
    # local s (half of it at P=2)
    assert micro_chunks(Options(), b=1, hq=8, s=64, world_size=2, itemsize=4) == 4
    assert micro_chunks(Options(), b=1, hq=8, s=60, world_size=3, itemsize=4) == 4
    assert micro_chunks(Options(), b=1, hq=8, s=64, world_size=6, itemsize=4) == 8  # divisor
    assert micro_chunks(Options(), b=1, hq=8, s=2, world_size=4, itemsize=4) == 2  # s < P
    assert micro_chunks(Options(micro_q=1), b=1, hq=8, s=64, world_size=2, itemsize=4) == 1


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("world", [2, 3])
def test_lss_saved_kv_exact(world, causal):
    # regather_kv=False keeps the forward's gathered K/V instead of gathering them again
    opts = msp.method_options("lss")(regather_kv=False)
    for errs in run_on_ranks(variant, world, "lss", "zigzag", opts, causal):
        assert max(errs) < RTOL, errs


@pytest.mark.parametrize("world", [3, 4])
def test_lightseq_unbalanced_exact(world):
    opts = msp.method_options("lightseq")(balance=False)
    for errs in run_on_ranks(variant, world, "lightseq", "contiguous", opts):
        assert max(errs) < RTOL, errs


def rsa_compat(rank, world):
    exact = run_case("rsa", "contiguous", True, 4, 4, 8, False, torch.float64, seed=3)
    opts = msp.method_options("rsa")(colossalai_compat=True)
    # run_case compares to the exact gradient: compat grads are exactly 1/P of it
    compat = run_case("rsa", "contiguous", True, 4, 4, 8, False, torch.float64, seed=3,
                      options=opts)
    return exact, compat


def test_rsa_colossalai_compat_scales_grads_by_one_over_p():
    for exact, compat in run_on_ranks(rsa_compat, 2):
        assert max(exact) < RTOL and compat[0] < RTOL  # output unchanged
        for e in compat[1:]:  # |g/2 - g| / |g| = 0.5
            assert abs(e - 0.5) < 1e-9


# fp32: unit round-off 6e-8; a row sums at most S=36 products of d=16 terms and a few
# log-sum-exp merges, so errors stay within a few hundred ulps of the largest value -> 2e-5.
# bf16: the fused kernel rounds each block's output (and the final output) to bf16, unit
# round-off 3.9e-3; a few roundings of values of the same magnitude stay below 2e-2.
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def low_precision(rank, world, method, dtype, layout):
    return [run_case(method, layout, causal, 8, 2, 16, True, dtype, seed=11, S_per_rank=12)
            for causal in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", msp.METHODS)
def test_low_precision(method, dtype):
    for per_rank in run_on_ranks(low_precision, 3, method, dtype, "zigzag"):
        for errs in per_rank:
            assert max(errs) < TOLERANCES[dtype], errs


def block_steps(rank, world, method, causal, layout, options=None):
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    with count_traffic() as t:
        msp.attention(q, q, q, method=method, causal=causal, layout=layout, options=options)
    return t.block_steps


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lightseq_balanced_critical_path(world):
    lightseq = msp.method_options("lightseq")
    balanced = run_on_ranks(block_steps, world, "lightseq", True, "contiguous", lightseq())
    unbalanced = run_on_ranks(block_steps, world, "lightseq", True, "contiguous",
                              lightseq(balance=False))
    assert max(balanced) <= world // 2 + 1, balanced
    assert unbalanced == list(range(1, world + 1)), unbalanced  # rank r computes r+1 blocks
    assert sum(balanced) == sum(unbalanced)  # every needed block exactly once


@pytest.mark.parametrize("method", msp.METHODS)
def test_block_steps_mean_the_same_in_every_method(method):
    """``Traffic.block_steps``: the (query shard, key shard) pairs of ranks with a visible
    (query, key) that a rank computed; over the ranks, each non-empty pair once. Causal and
    contiguous over 3 ranks: 6 pairs (j <= i); zigzag and bidirectional: all 9."""
    for causal, layout, total in ((True, "contiguous", 6), (True, "zigzag", 9),
                                  (False, "contiguous", 9)):
        got = run_on_ranks(block_steps, 3, method, causal, layout)
        assert sum(got) == total, (causal, layout, got)
        if method in ("rsa", "lss") and layout == "contiguous" and causal:
            assert got == [1, 2, 3]  # rank r's queries see ranks 0..r
        if method == "mqsp" and layout == "contiguous" and causal:
            assert got == [3, 2, 1]  # rank r's keys are seen by ranks r..P-1


@pytest.mark.parametrize("P", range(1, 9))
def test_schedule_covers_every_block_once(P):
    done = []
    for r in range(P):
        done.append((r, r))
        for st in schedule(P, r, causal=True, layout="contiguous", balance=True):
            if st.kv_from is not None:
                done.append((r, st.kv_from))  # (query owner, key owner)
            if st.q_from is not None:
                done.append((st.q_from, r))
        sends = [(st.kv_to, st.q_to) for st in schedule(P, r, causal=True, layout="contiguous",
                                                        balance=True)]
        for t, (kv_to, q_to) in enumerate(sends, start=1):  # senders and receivers agree
            peer = kv_to if kv_to is not None else q_to
            if peer is not None:
                st = schedule(P, peer, causal=True, layout="contiguous", balance=True)[t - 1]
                assert (st.kv_from if kv_to is not None else st.q_from) == r
    assert sorted(done) == sorted((i, j) for i in range(P) for j in range(i + 1))
