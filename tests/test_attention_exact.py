"""Every method equals single-process float64 attention, in output and dq/dk/dv.

The matrix: method x world size 1-4 x layout x causal/bidirectional x (GQA hq=8/hkv=2,
MHA with an odd head dim) x key padding (with fully masked rows). Each pytest case runs one
(method, world size, layout) on a gloo pool and checks all sub-cases there.
"""

import pytest
import torch
from distributed import run_on_ranks
from reference import make_padding, reference_attention

import megatron_seqpar as msp

RTOL = 1e-10  # float64: round-off of a few thousand fused multiply-adds stays near 1e-14


def relerr(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_case(method, layout, causal, hq, hkv, d, pad, dtype, seed, options=None, b=3,
             S_per_rank=12, group=None):
    """Returns max relative errors (out, dq, dk, dv) of this rank's shard."""
    world = torch.distributed.get_world_size(group)
    S = S_per_rank * world
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, S, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, S, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, S, hkv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, S, hq, d, generator=gen, dtype=torch.float64)
    # round to the tested dtype first, so the reference sees exactly the inputs the op sees
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    kpm = make_padding(b, S) if pad else None
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, causal=causal, key_padding_mask=kpm)
    ref.backward(dout)
    shard = lambda x: msp.shard_sequence(x, dim=1, group=group, layout=layout)  # noqa: E731
    mine = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
    out = msp.attention(*mine, method=method, group=group, causal=causal, layout=layout,
                        key_padding_mask=None if kpm is None else shard(kpm), options=options)
    out.backward(shard(dout).to(dtype))
    pairs = [(out, ref)] + [(m.grad, r.grad) for m, r in zip(mine, ref_in)]
    return [relerr(a.double(), shard(r.detach())) for a, r in pairs]


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


@pytest.mark.parametrize("layout", msp.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", msp.METHODS)
def test_exact_float64(method, world, layout):
    failures = run_on_ranks(exact_matrix, world, method, layout)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)
