"""Sliding windows, softmax sinks and MLA head dims: every method equals single-process
float64 attention (output, dq/dk/dv and the sinks' gradient summed over the group).

The matrix: method x world size 1-4 x layout x causal/bidirectional x windows ((0, 0), one-sided
either way, two-sided, wider than the sequence) x sinks x V head dims (equal, smaller, larger)
x key padding x GQA; packed streams and two levels with a window and sinks too. The work and
the traffic follow the window: blocks and transfers it leaves empty are skipped.
"""

import pytest
import torch
from distributed import run_on_ranks
from reference import check_sharded, make_padding

import megatron_seqpar as msp
from megatron_seqpar.comm import count_traffic
from megatron_seqpar.kernels import check_window, plan_blocks
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS, Run

RTOL = 1e-10  # float64: round-off of a few thousand fused multiply-adds stays near 1e-14
# Window (0, 0) without sinks: every row's softmax is one key, so dq and dk are exactly 0 and
# the computed ones are round-off (1e-16); they are compared absolutely against inputs of
# magnitude ~1 (standard normal), where 1e-10 is still far below any real error.
FLOOR = 1.0

WINDOWS = [(0, 0), (3, 0), (2, 5), (-1, 4), (5, -1), (1000, 1000)]


def run_case(method, layout, causal, window, sinks, dv, pad, seed, *, hq=4, hkv=2, d=16, b=3,
             s=12, cu=None, options=None):
    S = s * torch.distributed.get_world_size()
    shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout, cu_seqlens=cu)

    def call(q, k, v, kpm, **kw):
        return msp.attention(q, k, v, method=method, causal=causal, layout=layout,
                             key_padding_mask=kpm, window_size=window, cu_seqlens=cu,
                             options=options, **kw)

    return check_sharded(call, shard, b=b, S=S, hq=hq, hkv=hkv, d=d, seed=seed, causal=causal,
                         kpm=make_padding(b, S) if pad else None, dv=dv, window_size=window,
                         sinks=sinks, cu_seqlens=cu, floor=FLOOR)[0]


def window_matrix(rank, world, method):
    failures, i = [], 0
    for layout in SEQUENCE_LAYOUTS:
        for window in WINDOWS:
            for causal in (True, False):
                i += 1
                sinks, dv, pad = i % 2 == 0, (16, 8, 24)[i % 3], i % 4 < 2
                errs = run_case(method, layout, causal, window, sinks, dv, pad, seed=i)
                if max(errs) > RTOL or any(e != e for e in errs):
                    failures.append(f"{layout} window={window} causal={causal} sinks={sinks} "
                                    f"dv={dv} pad={pad}: rel err {errs}")
    return failures


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", msp.METHODS)
def test_window_sinks_mla_exact_float64(method, world):
    failures = run_on_ranks(window_matrix, world, method)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)


def packed_and_two_level(rank, world, method):
    unit = 2 * world
    cu = [0, unit, 3 * unit, 4 * unit, 6 * unit]  # lengths multiples of 2P: both layouts
    out = []
    for layout in msp.LAYOUTS:
        for window in ((3, 0), (4, 4)):
            errs = run_case(method, layout, True, window, True, 8, True, seed=5, s=12, cu=cu)
            out.append((f"packed {layout} {window}", errs))
    if world == 4:
        opts = msp.method_options(method)(head_parallel=2)
        for layout in SEQUENCE_LAYOUTS:
            errs = run_case(method, layout, True, (5, 0), True, 24, True, seed=6, hq=4, hkv=2,
                            options=opts)
            out.append((f"two levels {layout}", errs))
    return [f"{name}: rel err {errs}" for name, errs in out
            if max(errs) > RTOL or any(e != e for e in errs)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", msp.METHODS)
def test_window_packed_and_two_level_exact(method, world):
    failures = run_on_ranks(packed_and_two_level, world, method)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)


def test_planner_skips_what_the_window_leaves_empty():
    # 4 ranks of 16 contiguous tokens, causal window of 3: rank 2 sees only rank 1's last keys
    runs = [(Run(0, 16 * r, 16),) for r in range(4)]
    seen = [[bool(plan_blocks(runs[i], runs[j], True, window=(3, 0))) for j in range(4)]
            for i in range(4)]
    assert seen == [[i - 1 <= j <= i for j in range(4)] for i in range(4)]
    # the blocks hold every visible pair once and (almost) nothing else
    pairs = set()
    keys = (Run(0, 16, 16), Run(16, 32, 16))  # ranks 1 and 2's keys in one buffer
    for blk in plan_blocks(runs[2], keys, True, window=(3, 0)):
        for qi in range(blk.q.start, blk.q.stop):
            for kj in range(blk.k.start, blk.k.stop):
                assert (qi, kj) not in pairs
                pairs.add((qi, kj))
    visible = {(qi, kj) for qi in range(16) for kj in range(32) if 29 + qi <= 16 + kj <= 32 + qi}
    assert visible <= pairs
    # a row tile of n rows computes at most its band plus n keys (here one tile of 16 rows)
    assert len(pairs) <= 16 * (16 + 3 + 1)


def _traffic(rank, world, window, layout):
    out = {}
    for method in msp.METHODS:
        q, k, v = (torch.randn(2, 16, 2, 8).requires_grad_() for _ in range(3))
        with count_traffic() as t:  # the backward counts into the forward's Traffic
            msp.attention(q, k, v, method=method, window_size=window, layout=layout).sum() \
                .backward()
        out[method] = (t.sent_bytes, t.recv_bytes)
    return out


@pytest.mark.parametrize("layout", SEQUENCE_LAYOUTS)
def test_window_bytes_equal_the_model(layout):
    """Bytes sent and received per rank (fp32, forward + backward, 4 ranks of 16 tokens, causal
    window of 5) equal ``cost.attention_cost``; in the contiguous layout LightSeq sends the
    5 keys the window reaches to the next rank only and RSA's rings carry just those and stop
    after one step, against P-1 = 3 steps of whole shards without a window."""
    from megatron_seqpar.cost import AttnShape, attention_cost

    narrow = run_on_ranks(_traffic, 4, (5, 0), layout)
    for method in msp.METHODS:
        cost = attention_cost(method, AttnShape(S=64, P=4, b=2, hq=2, hkv=2, D=8, layout=layout,
                                                window=(5, 0)))
        assert [r[method] for r in narrow] == list(zip(cost.sent, cost.recv)), method
    if layout == "contiguous":
        kv = 2 * 16 * 2 * 8 * 4  # one shard's K (or V), fp32
        # RSA's ring (rsa.ring_ranges) and LightSeq move only the 5 keys of the neighbour's
        # 16 that the window reaches (kernels.kv_range), to one neighbour
        for method, sent in (("rsa", 2 * kv * 5 // 16), ("lightseq", 2 * kv * 5 // 16)):
            windowed, full = (attention_cost(method, AttnShape(
                S=64, P=4, b=2, hq=2, hkv=2, D=8, window=w)) for w in ((5, 0), None))
            assert max(windowed.sent_fwd) == sent, method
            assert max(full.sent_fwd) >= 2 * 2 * kv, method  # farther ranks too


@pytest.mark.parametrize("window, fix", [
    ((3,), "pair"), ((-2, 0), ">= -1"), ((1.5, 2), "ints"), ("left", "pair"), ((True, 0), "ints"),
])
def test_bad_windows_name_the_fix(window, fix):
    with pytest.raises(ValueError, match=fix):
        check_window(window)


def test_no_window_is_none():
    assert check_window(None) is None and check_window((-1, -1)) is None
    assert check_window((4, 0)) == (4, 0)


def _bad_offset(rank, world, offset, fix):
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=fix):
        msp.attention(q, q, q, method="lightseq", softmax_offset=offset)
    return True


@pytest.mark.parametrize("offset, fix", [
    (torch.zeros(3, dtype=torch.float64), r"shape \[2\]"),
    ([0.0, 0.0], "float tensor"),
    (torch.zeros(2, dtype=torch.long), "float tensor"),
    (torch.zeros(2, dtype=torch.float64, device="meta"), "device"),
])
def test_bad_softmax_offsets_name_the_fix(offset, fix):
    assert run_on_ranks(_bad_offset, 1, offset, fix) == [True]
