"""Every method equals single-process float64 attention, in output and dq/dk/dv.

The matrix: method x world size 1-4 x layout x causal/bidirectional x (GQA hq=8/hkv=2,
MHA with an odd head dim) x key padding (with fully masked rows). Each pytest case runs one
(method, world size, layout) on a gloo pool and checks all sub-cases there.
"""

import pytest
import torch
from distributed import run_on_ranks
from reference import check_sharded, make_padding

import megatron_seqpar as msp
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS

RTOL = 1e-10  # float64: round-off of a few thousand fused multiply-adds stays near 1e-14


def run_case(method, layout, causal, hq, hkv, d, pad, dtype, seed, options=None, b=3,
             S_per_rank=12, group=None):
    """Returns max relative errors (out, dq, dk, dv) of this rank's shard."""
    S = S_per_rank * torch.distributed.get_world_size(group)
    shard = lambda x: msp.shard_sequence(x, dim=1, group=group, layout=layout)

    def call(q, k, v, kpm):
        return msp.attention(q, k, v, method=method, group=group, causal=causal, layout=layout,
                             key_padding_mask=kpm, options=options)

    return check_sharded(call, shard, b=b, S=S, hq=hq, hkv=hkv, d=d, seed=seed, causal=causal,
                         kpm=make_padding(b, S) if pad else None, dtype=dtype)[0]


SUBCASES = [
    (causal, hq, hkv, d, pad)
    for causal in (True, False)
    for hq, hkv, d in ((8, 2, 16), (4, 4, 7))
    for pad in (False, True)
]


def exact_matrix(rank, world, method, layout):
    failures = []
    for i, (causal, hq, hkv, d, pad) in enumerate(SUBCASES):
        errs = run_case(method, layout, causal, hq, hkv, d, pad, torch.float64, seed=i)
        if max(errs) > RTOL or any(e != e for e in errs):
            failures.append(f"causal={causal} hq={hq} hkv={hkv} d={d} pad={pad}: "
                            f"out/dq/dk/dv rel err {errs}")
    return failures


@pytest.mark.parametrize("layout", SEQUENCE_LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", msp.METHODS)
def test_exact_float64(method, world, layout):
    failures = run_on_ranks(exact_matrix, world, method, layout)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)
