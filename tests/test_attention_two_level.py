"""Two-level sequence parallelism (``head_parallel = U``): a head all-to-all inside U
consecutive ranks x each method over the P/U groups equals single-process float64 attention.

The matrix per (method, world, U): P=4 with U=2 (x R=2) and U=4 (x R=1), P=3 with U=3 (x R=1)
(U=1 is the single-level method: tests/test_attention_exact.py); both layouts; causal and
bidirectional; MHA, GQA whose kv heads U divides, and GQA whose kv heads it does not (repeated);
key padding; and one packed stream (``cu_seqlens``) on top.
"""

import pytest
import torch
from distributed import run_on_ranks
from reference import check_sharded, make_padding

import megatron_seqpar as msp
from megatron_seqpar.comm import count_traffic
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS

RTOL = 1e-10  # float64: round-off of a few thousand fused multiply-adds stays near 1e-14


def run_case(method, layout, U, causal, hq, hkv, d, pad, seed, cu=None, b=3, s=12):
    S = s * torch.distributed.get_world_size()
    shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout, cu_seqlens=cu)
    opts = msp.method_options(method)(head_parallel=U)

    def call(q, k, v, kpm):
        return msp.attention(q, k, v, method=method, causal=causal, layout=layout, options=opts,
                             key_padding_mask=kpm, cu_seqlens=cu)

    return check_sharded(call, shard, b=b, S=S, hq=hq, hkv=hkv, d=d, seed=seed, causal=causal,
                         kpm=make_padding(b, S) if pad else None, cu_seqlens=cu)[0]


HEADS = {2: ((4, 4, 8), (8, 2, 16), (4, 1, 7)), 4: ((4, 4, 8), (8, 2, 16)),
         3: ((3, 3, 8), (6, 2, 16))}


def two_level_matrix(rank, world, method, U):
    failures = []
    i = 0
    for layout in msp.LAYOUTS:
        for causal in (True, False) if layout in SEQUENCE_LAYOUTS else ():
            for hq, hkv, d in HEADS[U]:
                for pad in (False, True):
                    i += 1
                    errs = run_case(method, layout, U, causal, hq, hkv, d, pad, seed=i)
                    if max(errs) > RTOL or any(e != e for e in errs):
                        failures.append(f"{layout} causal={causal} hq={hq} hkv={hkv} pad={pad}"
                                        f": out/dq/dk/dv rel err {errs}")
        unit = 2 * world  # a packed stream, each length a multiple of 2P (balanced: any)
        cu = [0, unit, 3 * unit, 4 * unit, 6 * unit]
        if layout == "balanced":
            cu = [0, 5, 5 + unit, 6 * unit - 3, 6 * unit]
        errs = run_case(method, layout, U, True, 8 if U != 3 else 6, 2, 8, True, seed=99, cu=cu)
        if max(errs) > RTOL:
            failures.append(f"{layout} packed {cu}: out/dq/dk/dv rel err {errs}")
    return failures


@pytest.mark.parametrize("world, U", [(4, 2), (4, 4), (3, 3)])
@pytest.mark.parametrize("method", msp.METHODS)
def test_two_level_exact_float64(method, world, U):
    failures = run_on_ranks(two_level_matrix, world, method, U)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)


def _same_as_single_level(rank, world, method):
    """``head_parallel=1`` is today's op, bit for bit (same output, same bytes)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 4, 8, generator=gen) for _ in range(3))
    with count_traffic() as t1:
        a = msp.attention(q, k, v, method=method, layout="zigzag")
    with count_traffic() as t2:
        b = msp.attention(q, k, v, method=method, layout="zigzag",
                          options=msp.method_options(method)(head_parallel=1))
    return torch.equal(a, b) and t1.sent_bytes == t2.sent_bytes


@pytest.mark.parametrize("method", msp.METHODS)
def test_head_parallel_one_is_single_level(method):
    assert all(run_on_ranks(_same_as_single_level, 2, method))


def _bad_split(rank, world, U, hq, fix):
    q = torch.randn(1, 8, hq, 4, dtype=torch.float64)
    opts = msp.method_options("lss")(head_parallel=U)
    with pytest.raises(ValueError, match=fix):
        msp.attention(q, q, q, method="lss", options=opts)


@pytest.mark.parametrize("U, hq, fix", [(3, 6, "does not divide the 4 ranks"),
                                        (2, 3, "does not divide the 3 query heads")])
def test_bad_splits_name_the_fix(U, hq, fix):
    run_on_ranks(_bad_split, 4, U, hq, fix)


def test_head_parallel_must_be_positive():
    with pytest.raises(ValueError, match="positive integer"):
        msp.method_options("rsa")(head_parallel=0)


def _subgroups_keep_the_timeout(rank, world):
    from megatron_seqpar.headpar import _timeout_of, two_level_groups

    groups = two_level_groups(None, 2)
    again = two_level_groups(None, 2)  # cached: the same groups, not new ones
    parent = _timeout_of(torch.distributed.group.WORLD)
    return (groups.inner is again.inner and groups.outer is again.outer,
            _timeout_of(groups.inner) == parent == _timeout_of(groups.outer), parent)


def test_subgroups_are_cached_and_keep_the_timeout():
    for cached, same, parent in run_on_ranks(_subgroups_keep_the_timeout, 4):
        assert cached and same and parent is not None
