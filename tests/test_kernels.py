"""The shared machinery on its own: backends agree, merges are exact, blocks are planned right."""

import pytest
import torch
from emulated_cuda import EMULATED, _cudnn_bwd_3d, _cudnn_fwd_3d

from megatron_seqpar import kernels_cuda
from megatron_seqpar.kernels import (
    BACKENDS,
    attend,
    attend_backward,
    block_attention,
    block_attention_backward,
    merge_,
    pick_backend,
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


@pytest.mark.parametrize("tile", [1, 3, 4])
@pytest.mark.parametrize("mask_id", [0, 1])
@pytest.mark.parametrize("s", [9, 16])
def test_cpu_causal_tiles_match_reference(monkeypatch, tile, mask_id, s):
    """Causal blocks longer than the tile are cut into halves on the CPU kernel: the pieces
    cover every visible pair exactly once, and out/lse/grads equal the whole block's."""
    from megatron_seqpar import kernels

    tiles = kernels._causal_tiles(s, tile)
    seen = torch.zeros(s, s, dtype=torch.int64)
    for rows, keys, tri in tiles:
        blk = torch.ones(rows.stop - rows.start, keys.stop - keys.start, dtype=torch.int64)
        seen[rows, keys] += blk.tril() if tri else blk
    assert torch.equal(seen, torch.ones(s, s, dtype=torch.int64).tril())
    monkeypatch.setattr(kernels, "CPU_CAUSAL_TILE", tile)
    b, hq, hkv, d = 2, 4, 2, 6
    q, k, v, do = (rand(b, h, s, d, seed=i) for i, h in enumerate((hq, hkv, hkv, hq)))
    mask = masks(b, s, s)[mask_id]
    assert kernels._tiled(q, k, True, mask) is not None  # the tiled path runs
    ref = block_attention(q, k, v, scale=0.3, causal=True, mask=mask, backend="reference")
    got = block_attention(q, k, v, scale=0.3, causal=True, mask=mask, backend="cpu_flash")
    assert torch.allclose(got[0], ref[0], rtol=0, atol=RTOL)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))
    fin = ~torch.isinf(ref[1])
    assert torch.allclose(got[1][fin], ref[1][fin], rtol=0, atol=RTOL)
    gr = block_attention_backward(do, q, k, v, ref[0], ref[1], scale=0.3, causal=True,
                                  mask=mask, backend="reference")
    gg = block_attention_backward(do, q, k, v, ref[0], ref[1], scale=0.3, causal=True,
                                  mask=mask, backend="cpu_flash")
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["full", "causal", "padded", "causal+padded"])
def test_cuda_auto_matches_reference(kind, dtype):
    """The real CUDA kernels ``auto`` picks (tools/gpu_check.py section a goes further)."""
    dev = torch.device("cuda")
    has_mask, causal = kind not in ("full", "causal"), kind.startswith("causal")
    q, k, v, do = (rand(2, 64, h, 32, dtype=torch.float32, seed=i).to(dev, dtype)
                   .transpose(1, 2) for i, h in enumerate((8, 2, 2, 8)))
    mask = None
    if has_mask:
        mask = torch.zeros(2, 1, 1, 64, dtype=torch.bool, device=dev)
        mask[0, ..., :7] = True
        mask[1, ..., 40:] = True
    ref = block_attention(q.double(), k.double(), v.double(), scale=0.2, causal=causal,
                          mask=mask, backend="reference")
    got = block_attention(q, k, v, scale=0.2, causal=causal, mask=mask)
    assert (got[0].double() - ref[0]).abs().max() < 2e-2  # bf16 output rounding
    assert torch.equal(torch.isneginf(got[1]), torch.isinf(ref[1]))
    gr = block_attention_backward(do.double(), q.double(), k.double(), v.double(), ref[0],
                                  ref[1], scale=0.2, causal=causal, mask=mask,
                                  backend="reference")
    gg = block_attention_backward(do, q, k, v, got[0], got[1], scale=0.2, causal=causal,
                                  mask=mask)
    for a, r in zip(gg, gr):  # bf16 inputs and gradients: ~3 significant digits
        assert (a.double() - r).abs().max() / r.abs().max() < 3e-2


# ----------------------------------------------------------------------------- CUDA path on CPU
CUDA_OPS = frozenset({"reference", "cpu_flash", "cuda_flash", "cuda_efficient"})
F16S = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["full", "causal", "padded", "causal+padded", "mask"])
def test_dispatch_table(kind, dtype):
    """``auto``'s pick per block kind and dtype, as documented in ``kernels_cuda``."""
    has_mask, causal = kind not in ("full", "causal"), kind.startswith("causal")
    got = kernels_cuda.choose_backend("cuda", dtype, has_mask, causal, 128, CUDA_OPS)
    if dtype == torch.float64:
        want = "reference"
    elif dtype in F16S and not has_mask:
        want = "cuda_flash"
    else:
        want = "cuda_efficient"
    assert got == want
    assert kernels_cuda.choose_backend("cpu", dtype, has_mask, causal, 128, CUDA_OPS) == \
        "cpu_flash"
    # odd head dims and builds without the fused ops fall back to the reference kernel
    assert kernels_cuda.choose_backend("cuda", dtype, has_mask, causal, 36, CUDA_OPS) == \
        "reference"
    assert kernels_cuda.choose_backend("cuda", dtype, has_mask, causal, 128,
                                       frozenset({"reference"})) == "reference"
    assert kernels_cuda.choose_backend("cuda", dtype, has_mask, causal, 128,
                                       CUDA_OPS - {"cuda_flash"}) == \
        ("reference" if dtype == torch.float64 else "cuda_efficient")


def test_named_backend_falls_back_and_unknown_raises():
    q = torch.zeros(1, 2, 4, 8)
    assert pick_backend("cuda_flash", q, None).name == "reference"  # a CPU tensor
    assert kernels_cuda.supports("cuda_cudnn", "cuda", torch.bfloat16, False, True, 128)
    assert not kernels_cuda.supports("cuda_cudnn", "cuda", torch.bfloat16, True, True, 128)
    assert not kernels_cuda.supports("cuda_cudnn", "cuda", torch.float32, False, True, 128)
    assert kernels_cuda.choose_backend("cuda", torch.bfloat16, False, True, 128,
                                       CUDA_OPS | {"cuda_cudnn"}) == "cuda_flash"  # opt-in
    assert pick_backend("auto", q, None).name == "cpu_flash"
    assert "cuda_efficient" in kernels_cuda.available_backends()  # the schema exists on CPU
    with pytest.raises(ValueError, match="unknown kernel backend"):
        pick_backend("nope", q, None)


def test_standard_layouts_never_need_an_explicit_triangle():
    """The planner emits only full and square causal blocks for contiguous/zigzag shards and
    MQSP-style micro-chunks of them: the fused kernels' own causal masks cover all of them."""
    for P in (1, 2, 3, 4, 8):
        for layout in ("contiguous", "zigzag"):
            s = 24
            for r in range(P):
                for j in range(P):
                    for m in (1, 2, 3, 4, 6):
                        c = s // m
                        for i in range(m):
                            qr = slice_runs(local_runs(layout, r, P, s), i * c, (i + 1) * c)
                            kinds = {b.kind for b in plan_blocks(
                                qr, local_runs(layout, j, P, s), causal=True)}
                            assert kinds <= {"full", "causal"}, (P, layout, r, j, m, i)


def test_dead_rows_match_brute_force():
    pad = torch.rand(3, 1, 1, 9, generator=torch.Generator().manual_seed(3)) < 0.5
    pad[0, ..., :4] = True  # the first causal rows see only padding
    pad[1] = True
    tri = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert torch.equal(kernels_cuda.dead_rows(pad, True, 9), (pad | tri).all(-1))
    assert torch.equal(kernels_cuda.dead_rows(pad, False, 9), pad.all(-1).expand(3, 1, 9))
    dense = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(4)) < 0.8
    assert torch.equal(kernels_cuda.dead_rows(dense, False, 9), dense.all(-1))
    assert kernels_cuda.dead_rows(None, True, 9) is None
    # top-left causal over more rows than keys: rows past the last key see every key
    tall = (pad.view(3, 1, 1, 9) | torch.ones(12, 9, dtype=torch.bool).triu(1)).all(-1)
    assert torch.equal(kernels_cuda.dead_rows(pad, True, 12), tall)


def test_bias_is_broadcast_not_materialised():
    pad = torch.zeros(2, 1, 1, 20, dtype=torch.bool)
    pad[0, ..., 3] = True
    bias = kernels_cuda._bias(pad, torch.bfloat16, 2, 8, 50, 20)
    assert bias.shape == (2, 8, 50, 20) and bias.stride(1) == bias.stride(2) == 0
    assert bias.stride(3) == 1 and bias.stride(0) % kernels_cuda.BIAS_ALIGN == 0
    assert bias.untyped_storage().nbytes() == 2 * 32 * 2  # [2, 1, 1, 32] bf16
    assert bias[0, 5, 7, 3] == float("-inf") and bias[1, 0, 0, 3] == 0


@pytest.mark.parametrize("backend", ["cuda_flash", "cuda_efficient", "cuda_cudnn"])
@pytest.mark.parametrize("kind", ["full", "causal", "padded", "causal+padded", "mask"])
def test_cuda_glue_with_emulated_kernels(monkeypatch, backend, kind):
    """The CUDA backends' glue (layouts, GQA expansion and group sums, bias, lse padding,
    empty rows) around float64 CPU emulations of the aten kernels, against the reference."""
    monkeypatch.setattr(kernels_cuda, "_op", EMULATED.__getitem__)
    has_mask, causal = kind not in ("full", "causal"), kind.startswith("causal")
    if backend != "cuda_efficient" and has_mask:
        pytest.skip(f"{backend} serves unmasked blocks only (see test_dispatch_table)")
    b, hq, hkv, s, d = 3, 4, 2, 37, 8  # 37 rows: the efficient lse is padded to 64
    # public [b, s, h, d] storage, [b, h, s, d] views: what the methods pass
    q, k, v, do = (rand(b, s, h, d, dtype=torch.float32, seed=i).transpose(1, 2)
                   for i, h in enumerate((hq, hkv, hkv, hq)))
    mask = None
    if has_mask:
        mask = torch.zeros(b, 1, 1, s, dtype=torch.bool)
        mask[0, ..., :5] = True  # causal rows 0-4 see only padding
        mask[1] = True  # a sample with no visible key at all
        if kind == "mask":
            tri = torch.ones(s, s, dtype=torch.bool).triu(3).view(1, 1, s, s)
            mask = mask | tri
    ref = block_attention(q.double(), k.double(), v.double(), scale=0.3, causal=causal,
                          mask=mask, backend="reference")
    got = BACKENDS[backend].forward(q, k, v, 0.3, causal, mask)
    tol = 1e-5  # fp32 inputs, float64 emulation: rounding of the fp32 output only
    assert torch.allclose(got[0].double(), ref[0], atol=tol, rtol=0)
    assert torch.equal(torch.isneginf(got[1]), torch.isinf(ref[1]))
    fin = ~torch.isinf(ref[1])
    assert torch.allclose(got[1].double()[fin], ref[1][fin], atol=tol, rtol=0)
    gr = block_attention_backward(do.double(), q.double(), k.double(), v.double(), ref[0],
                                  ref[1], scale=0.3, causal=causal, mask=mask,
                                  backend="reference")
    gg = BACKENDS[backend].backward(do, q, k, v, ref[0].float(), ref[1].float(), 0.3, causal,
                                    mask)
    for a, r, x in zip(gg, gr, (q, k, v)):
        assert a.shape == x.shape and torch.isfinite(a).all()
        assert torch.allclose(a.double(), r, atol=1e-4, rtol=0)  # fp32 grads, s = 37 terms


def test_flash_backward_hands_the_kernel_a_dense_lse(monkeypatch):
    """The flash kernel reads lse as a dense ``[b, h, sq]``: a merged lse with other strides
    (here ``[b, sq, h]`` storage) is made contiguous first (the emulation asserts it)."""
    monkeypatch.setattr(kernels_cuda, "_op", EMULATED.__getitem__)
    q, k, v, do = (rand(2, 9, h, 8, dtype=torch.float32, seed=i).transpose(1, 2)
                   for i, h in enumerate((4, 2, 2, 4)))
    out, lse = BACKENDS["cuda_flash"].forward(q, k, v, 0.3, True, None)
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [b, sq, h] storage
    assert not strided.is_contiguous()
    want = BACKENDS["cuda_flash"].backward(do, q, k, v, out, lse, 0.3, True, None)
    got = BACKENDS["cuda_flash"].backward(do, q, k, v, out, strided, 0.3, True, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cudnn_backward_takes_the_lse_rank_its_forward_returned(monkeypatch):
    """A build whose cuDNN forward returns a 3-d lse while its meta kernel says 4-d."""
    ops = dict(EMULATED, _scaled_dot_product_cudnn_attention=_cudnn_fwd_3d,
               _scaled_dot_product_cudnn_attention_backward=_cudnn_bwd_3d)
    monkeypatch.setattr(kernels_cuda, "_op", ops.__getitem__)
    monkeypatch.setattr(kernels_cuda, "_CUDNN_LSE_DIMS", {})
    q, k, v, do = (rand(2, 9, h, 8, dtype=torch.float32, seed=i).transpose(1, 2)
                   for i, h in enumerate((4, 2, 2, 4)))
    out, lse = BACKENDS["cuda_cudnn"].forward(q, k, v, 0.3, True, None)
    grads = BACKENDS["cuda_cudnn"].backward(do, q, k, v, out, lse, 0.3, True, None)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_flash_and_cudnn_need_sm80():
    """Pre-Ampere GPUs (V100: sm70, T4: sm75) fall back to the efficient kernel."""
    for cap, want in (((7, 0), "cuda_efficient"), ((7, 5), "cuda_efficient"),
                      ((8, 0), "cuda_flash"), ((9, 0), "cuda_flash"), (None, "cuda_flash")):
        assert kernels_cuda.choose_backend("cuda", torch.bfloat16, False, True, 128, CUDA_OPS,
                                           capability=cap) == want
        assert kernels_cuda.supports("cuda_cudnn", "cuda", torch.bfloat16, False, True, 128,
                                     capability=cap) == (want == "cuda_flash")
