"""The shared machinery on its own: backends agree, merges are exact, blocks are planned right."""

import pytest
import torch

from megatron_seqpar.kernels import (
    BACKENDS,
    attend,
    attend_backward,
    block_attention,
    block_attention_backward,
    merge_,
    plan_blocks,
)
from megatron_seqpar.layouts import Run, local_runs, positions, slice_runs

RTOL = 1e-12  # float64 block math, a few hundred terms


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def masks(b, sq, sk):
    pad = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    pad[0, ..., : sk // 2] = True
    pad[1] = True  # a sample whose rows see nothing
    return [None, pad, torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(1)) < .3]


@pytest.mark.parametrize("backend", ["cpu_flash"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_id", [0, 1, 2])
def test_backend_matches_reference(backend, causal, mask_id):
    b, hq, hkv, s, d = 2, 4, 2, 10, 6
    q, k, v, do = (rand(b, h, s, d, seed=i) for i, h in enumerate((hq, hkv, hkv, hq)))
    mask = masks(b, s, s)[mask_id]
    ref = block_attention(q, k, v, scale=0.3, causal=causal, mask=mask, backend="reference")
    got = block_attention(q, k, v, scale=0.3, causal=causal, mask=mask, backend=backend)
    assert torch.allclose(got[0], ref[0], rtol=0, atol=RTOL)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))  # empty rows: lse = -inf
    fin = ~torch.isinf(ref[1])
    assert torch.allclose(got[1][fin], ref[1][fin], rtol=0, atol=RTOL)
    gr = block_attention_backward(do, q, k, v, ref[0], ref[1], scale=0.3, causal=causal,
                                  mask=mask, backend="reference")
    gg = block_attention_backward(do, q, k, v, ref[0], ref[1], scale=0.3, causal=causal,
                                  mask=mask, backend=backend)
    for a, r in zip(gg, gr):
        assert torch.allclose(a.double(), r, rtol=0, atol=RTOL)


def test_merge_equals_attention_over_the_union():
    q, k, v = rand(1, 2, 5, 4, seed=1), rand(1, 2, 8, 4, seed=2), rand(1, 2, 8, 4, seed=3)
    full = block_attention(q, k, v, scale=0.5, backend="reference")
    a = block_attention(q, k[:, :, :3], v[:, :, :3], scale=0.5, backend="reference")
    b = block_attention(q, k[:, :, 3:], v[:, :, 3:], scale=0.5, backend="reference")
    out, lse = a[0].clone(), a[1].clone()
    merge_(out, lse, *b)
    assert torch.allclose(out, full[0], atol=RTOL) and torch.allclose(lse, full[1], atol=RTOL)


def test_merge_with_empty_sides():
    out = torch.zeros(1, 1, 2, 3)
    lse = torch.tensor([[[float("-inf"), 0.5]]])
    ob, lb = torch.ones(1, 1, 2, 3), torch.tensor([[[float("-inf"), float("-inf")]]])
    merge_(out, lse, ob, lb)  # row 0: both empty; row 1: the other side is empty
    assert torch.equal(out, torch.zeros(1, 1, 2, 3))
    assert lse[0, 0, 0] == float("-inf") and lse[0, 0, 1] == 0.5


def test_plan_blocks_kinds():
    # queries at [8, 12) against keys [0, 4) + [8, 12) + [12, 16): full, diagonal, skipped
    q_runs = (Run(0, 8, 4),)
    k_runs = (Run(0, 0, 4), Run(4, 8, 4), Run(8, 12, 4))
    kinds = [(b.kind, b.k) for b in plan_blocks(q_runs, k_runs, causal=True)]
    assert kinds == [("full", slice(0, 4)), ("causal", slice(4, 8))]
    # adjacent fully visible runs are joined into one kernel call
    joined = plan_blocks((Run(0, 20, 4),), k_runs, causal=True)
    assert [(b.kind, b.k) for b in joined] == [("full", slice(0, 12))]
    # a micro-chunk inside a key run: keys before it full, its own positions diagonal
    micro = plan_blocks((Run(0, 6, 2),), (Run(0, 4, 4),), causal=True)
    assert [(b.kind, b.k) for b in micro] == [("full", slice(0, 2)), ("causal", slice(2, 4))]
    # partial overlap that is not the same positions: explicit mask
    odd = plan_blocks((Run(0, 6, 4),), (Run(0, 4, 4),), causal=True)
    assert [b.kind for b in odd] == ["full", "mask"]
    # a zigzag shard against itself: one diagonal block over both runs (local order is
    # position order, so the local triangle is the causal mask)
    own = (Run(0, 0, 4), Run(4, 28, 4))
    assert [(b.kind, b.q, b.k) for b in plan_blocks(own, own, causal=True)] == \
        [("causal", slice(0, 8), slice(0, 8))]
    # query runs that each see only the same fully visible keys share one call
    shared = plan_blocks((Run(0, 8, 4), Run(4, 20, 4)), (Run(0, 0, 4),), causal=True)
    assert [(b.kind, b.q, b.k) for b in shared] == [("full", slice(0, 8), slice(0, 4))]
    # ... but not when one of them also has a diagonal block
    mixed = plan_blocks((Run(0, 8, 4), Run(4, 12, 4)), (Run(0, 0, 4), Run(4, 12, 4)), True)
    assert [(b.kind, b.q) for b in mixed] == [("full", slice(0, 4)), ("full", slice(4, 8)),
                                              ("causal", slice(4, 8))]


def test_attend_with_arbitrary_runs_matches_masked_reference():
    q_runs = (Run(0, 3, 4), Run(4, 20, 3))
    k_runs = (Run(0, 0, 5), Run(5, 18, 4), Run(9, 5, 2))
    q, k, v, do = rand(2, 4, 7, 8, seed=5), rand(2, 2, 11, 8, seed=6), rand(2, 2, 11, 8, seed=7), \
        rand(2, 4, 7, 8, seed=8)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, :7] = True
    qp, kp = positions(q_runs), positions(k_runs)
    mask = (kp[None, :] > qp[:, None]).view(1, 1, 7, 11) | kpm.view(2, 1, 1, 11)
    ref = block_attention(q, k, v, scale=0.4, mask=mask, backend="reference")
    out, lse = attend(q, q_runs, k, v, k_runs, scale=0.4, causal=True, kpm=kpm)
    assert torch.allclose(out, ref[0], atol=RTOL)
    gr = block_attention_backward(do, q, k, v, ref[0], ref[1], scale=0.4, mask=mask,
                                  backend="reference")
    gg = attend_backward(do, q, q_runs, k, v, k_runs, out, lse, scale=0.4, causal=True, kpm=kpm)
    for a, r in zip(gg, gr):
        assert torch.allclose(a, r, atol=RTOL)


def test_layout_runs():
    assert local_runs("contiguous", 1, 4, 6) == (Run(0, 6, 6),)
    assert local_runs("zigzag", 1, 4, 6) == (Run(0, 3, 3), Run(3, 18, 3))
    assert slice_runs(local_runs("zigzag", 0, 2, 8), 2, 6, offset=10) == (
        Run(10, 2, 2), Run(12, 12, 2))
    with pytest.raises(ValueError, match="even local length"):
        local_runs("zigzag", 0, 2, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_matches_reference(causal):
    dev = torch.device("cuda")
    q, k, v, do = (rand(2, h, 64, 32, dtype=torch.float32, seed=i).to(dev)
                   for i, h in enumerate((8, 2, 2, 8)))
    qb, kb, vb, dob = (x.bfloat16() for x in (q, k, v, do))
    ref = block_attention(qb.double(), kb.double(), vb.double(), scale=0.2, causal=causal,
                          backend="reference")
    got = BACKENDS["cuda_flash"].forward(qb, kb, vb, 0.2, causal, None)
    assert (got[0].double() - ref[0]).abs().max() < 2e-2  # bf16 output rounding
    gr = block_attention_backward(dob.double(), qb.double(), kb.double(), vb.double(), ref[0],
                                  ref[1], scale=0.2, causal=causal, backend="reference")
    gg = BACKENDS["cuda_flash"].backward(dob, qb, kb, vb, got[0], got[1], 0.2, causal, None)
    for a, r in zip(gg, gr):
        assert (a.double() - r).abs().max() / r.abs().max() < 3e-2
