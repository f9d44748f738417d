"""Packed sequences (``cu_seqlens``): every method equals single-process float64 attention with
a block-diagonal (per-sequence) mask, in output and dq/dk/dv.

The matrix per (method, world size 1-4, layout): packings with a sequence of exactly 2P tokens,
sequences shorter than one rank's shard, many short sequences beside one long one, an empty
sequence, and (contiguous) lengths that straddle ranks anywhere; causal and bidirectional; GQA
8/2 and MHA with an odd head dim; key padding inside the sequences.
"""

import pytest
import torch
from distributed import run_on_ranks
from reference import check_sharded, reference_attention, relerr

import megatron_seqpar as msp
from megatron_seqpar.kernels import count_blocks
from megatron_seqpar.layouts import Run, local_runs

RTOL = 1e-10  # float64: round-off of a few thousand fused multiply-adds stays near 1e-14
S_PER_RANK = 24


def packings(world, layout):
    """cu_seqlens of a ``24*world`` stream; zigzag ones use lengths in units of 2P."""
    u = 2 * world  # 12 units in all
    units = [[1, 6, 2, 3], [1, 1, 1, 1, 1, 1, 6], [4, 0, 8]]
    out = []
    for lens in units:
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n * u)
        out.append(cu)
    if layout != "zigzag":  # any lengths: straddling ranks at odd places
        S = S_PER_RANK * world
        out.append([0, 5, 5 + (S - 9) // 2, S - 3, S])
    return out


def inner_padding(b, cu):
    """Padding tokens at the end of every other sequence, and one whole sequence padded."""
    S = cu[-1]
    kpm = torch.zeros(b, S, dtype=torch.bool)
    for i, (a, e) in enumerate(zip(cu, cu[1:])):
        if e - a >= 2 and i % 2 == 0:
            kpm[0, e - (e - a) // 3 - 1: e] = True
    if b > 1 and len(cu) > 2:
        kpm[1, cu[0]: cu[1]] = True  # a sequence with nothing to attend to
    return kpm


def run_case(method, layout, causal, hq, hkv, d, pad, cu, seed, options=None, b=2):
    """Relative errors (out, dq, dk, dv, and the gathered output) of this rank."""
    S = S_PER_RANK * torch.distributed.get_world_size()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout, cu_seqlens=cu_t)

    def call(q, k, v, kpm):
        return msp.attention(q, k, v, method=method, causal=causal, layout=layout,
                             options=options, key_padding_mask=kpm, cu_seqlens=cu_t)

    kpm = inner_padding(b, cu) if pad else None
    errs, out = check_sharded(call, shard, b=b, S=S, hq=hq, hkv=hkv, d=d, seed=seed,
                              causal=causal, kpm=kpm, cu_seqlens=cu)
    # gather restores stream order: compare with the full reference output
    back = msp.gather_sequence(out.detach(), dim=1, layout=layout, cu_seqlens=cu_t)
    full = check_sharded(lambda q, k, v, m: reference_attention(
        q, k, v, causal=causal, key_padding_mask=m, cu_seqlens=cu), lambda x: x, b=b, S=S,
        hq=hq, hkv=hkv, d=d, seed=seed, causal=causal, kpm=kpm, cu_seqlens=cu)[1]
    return errs + [relerr(back, full.detach())]


SUBCASES = [
    (causal, hq, hkv, d, pad)
    for causal in (True, False)
    for hq, hkv, d in ((8, 2, 16), (4, 4, 7))
    for pad in (False, True)
]


def packed_matrix(rank, world, method, layout):
    failures = []
    for ci, cu in enumerate(packings(world, layout)):
        for i, (causal, hq, hkv, d, pad) in enumerate(SUBCASES):
            errs = run_case(method, layout, causal, hq, hkv, d, pad, cu, seed=10 * ci + i)
            if max(errs) > RTOL or any(e != e for e in errs):
                failures.append(f"cu={cu} causal={causal} hq={hq} hkv={hkv} d={d} pad={pad}: "
                                f"out/dq/dk/dv/gathered rel err {errs}")
    return failures


@pytest.mark.parametrize("layout", msp.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", msp.METHODS)
def test_packed_exact_float64(method, world, layout):
    failures = run_on_ranks(packed_matrix, world, method, layout)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)


def test_runs_follow_the_packing():
    """Zigzag cuts every sequence into 2P chunks (TE's thd_get_partitioned_indices);
    contiguous cuts the stream at the rank boundaries and the runs at the sequences'."""
    cu = (0, 4, 12)  # P=2: lengths 4 and 8, chunks of 1 and 2
    assert local_runs("zigzag", 0, 2, 6, cu) == (
        Run(0, 0, 1, 0), Run(1, 3, 1, 0), Run(2, 4, 2, 1), Run(4, 10, 2, 1))
    assert local_runs("zigzag", 1, 2, 6, cu) == (
        Run(0, 1, 1, 0), Run(1, 2, 1, 0), Run(2, 6, 2, 1), Run(4, 8, 2, 1))
    assert local_runs("contiguous", 0, 2, 6, cu) == (Run(0, 0, 4, 0), Run(4, 4, 2, 1))
    assert local_runs("contiguous", 1, 2, 6, cu) == (Run(0, 6, 6, 1),)


def test_cross_sequence_blocks_cost_nothing():
    """A rank pair whose tokens share no sequence plans no kernel call at all, and the work
    is the sum over sequences, not the whole stream."""
    cu = (0, 8, 16)  # contiguous over 2 ranks: each rank holds one whole sequence
    r0, r1 = (local_runs("contiguous", j, 2, 8, cu) for j in range(2))
    assert count_blocks(r1, r0, causal=True) == 0
    assert count_blocks(r0, r1, causal=False) == 0
    assert count_blocks(r1, r1, causal=False) == 1


def test_shard_gather_roundtrip_zigzag():
    cu = torch.tensor([[0, 4, 12, 24]])  # a [1, n+1] cu_seqlens, as some loaders give
    x = torch.arange(24).view(1, 24)
    assert msp.shard_sequence(x, dim=1, layout="zigzag", cu_seqlens=cu).tolist() == [
        list(range(24))]


@pytest.mark.parametrize("cu, fix", [
    ([1, 24], "start at 0"),
    ([0, 12, 20], "last entry must be the global length"),
    ([0, 14, 12, 24], "non-decreasing"),
    ([0, 6, 24], "multiple of 2\\*P"),
    (torch.tensor([0.0, 24.0]), "integer tensor"),
    (torch.tensor([[0, 12], [12, 24]]), "1-d"),
])
def test_bad_packings_name_the_fix(cu, fix):
    run_on_ranks(_bad_packing, 2, cu, fix)


def _bad_packing(rank, world, cu, fix):
    q = torch.randn(1, 12, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=fix):
        msp.attention(q, q, q, method="lightseq", layout="zigzag", cu_seqlens=cu)


def test_local_block_is_one_diagonal_per_sequence():
    """A zigzag rank against its own K/V: each sequence's two chunks make ONE causal kernel
    call (their local triangle is the sequence's causal mask), not three."""
    from megatron_seqpar.kernels import plan_blocks

    cu = (0, 8, 24, 32)  # P=2: chunks of 2, 4 and 2 tokens
    runs = local_runs("zigzag", 1, 2, 16, cu)
    blocks = plan_blocks(runs, runs, causal=True)
    assert [(b.q, b.k, b.kind) for b in blocks] == [
        (slice(0, 4), slice(0, 4), "causal"), (slice(4, 12), slice(4, 12), "causal"),
        (slice(12, 16), slice(12, 16), "causal")]
    # a sequence split over non-adjacent runs (two levels) falls back to the general plan
    two = runs + tuple(r._replace(local=r.local + 16) for r in runs)
    assert count_blocks(two, two, causal=True) > 3
