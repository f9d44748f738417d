"""The CUDA path of the package, exercised on this CPU-only machine (issue 24, item 2).

Three dry runs, each as close to CUDA as a CPU-only torch 2.13 allows:

1. The CUDA kernels' glue on *fake CUDA tensors* (``FakeTensorMode``): every CUDA backend's
   forward and backward around the real aten ops' meta kernels (shapes, dtypes, strides, the
   efficient kernel's lse padding and trim, GQA) and ``auto``'s pick per block.
2. Every method, forward and backward through ``msp.attention`` at P=1, on *meta tensors* with
   the dispatch planning for CUDA (``kernels.device_kind`` answers "cuda", the one seam): the
   methods' CUDA plan (RSA's batched blocks included), the kernels' glue and the aten meta
   kernels, and no host read (a meta tensor's value cannot be read: ``.item()``,
   ``.tolist()``, ``torch.equal`` raise).
3. Every method at P=2 and P=3 on gloo with the CUDA plan and float64 CPU *emulations* of the
   aten CUDA kernels (``tests/emulated_cuda.py``): the CUDA plan is exact, and padding-free
   blocks of a padded call run the flash kernel.

What cannot be faked here, and why:
- fake CUDA tensors cannot be indexed (``x[0]`` asks for a CUDA device guard: "PyTorch is not
  linked with support for cuda devices") nor enter autograd (its input metadata does the
  same), so run 2 uses meta tensors for the methods, which index and differentiate;
- CUDA streams and events (``torch.cuda.Stream`` requires CUDA) and NCCL: the P>1 runs use
  gloo (run 3); the side-stream code of ``comm.py`` runs only on a GPU (tools/gpu_check.py);
- torch 2.13's meta kernel of ``_efficient_attention_backward`` lacks the schema's ``out``
  argument (its registered signature is one positional short, so a schema-true call fails
  with "got multiple values for argument 'scale'"); runs 1 and 2 replace it by a stand-in
  that checks the call against the op's schema and returns the gradients' shapes.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from distributed import run_on_ranks
from emulated_cuda import cuda_plan_on_cpu
from reference import check_sharded
from torch._subclasses.fake_tensor import FakeTensorMode

import megatron_seqpar as msp
from megatron_seqpar import kernels, kernels_cuda, rsa
from megatron_seqpar.api import Setup
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS

_OP = kernels_cuda._op
_EFF_BWD = torch.ops.aten._efficient_attention_backward.default._schema


def _efficient_backward_shapes(*args, **kwargs):
    """Stand-in for the broken meta kernel: bind the call to the op's schema (the real
    kernel's), then return (dq, dk, dv, dbias) shaped like q, k, v."""
    names = [a.name for a in _EFF_BWD.arguments]
    positional = [a for a in _EFF_BWD.arguments if not a.kwarg_only]
    assert len(args) == len(positional), f"{len(args)} positional args, schema {len(positional)}"
    assert set(kwargs) <= set(names), kwargs
    grad_out, q, k, v, bias, out = args[:6]
    assert out.shape == grad_out.shape == q.shape and args[10].dim() == 3  # lse [b, h, sq_pad]
    assert args[10].size(2) % kernels_cuda.LSE_ALIGN == 0
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def _fake_ops():
    def op(name):
        if name == "_efficient_attention_backward":
            return _efficient_backward_shapes
        return _OP(name)

    kernels_cuda._op = op
    try:
        yield
    finally:
        kernels_cuda._op = _OP


KINDS = ("full", "causal", "padded", "causal+padded")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_on_fake_cuda_tensors(dtype):
    b, hq, hkv, s, d = 2, 8, 2, 100, 64  # 100 rows: the efficient lse is padded to 128
    with FakeTensorMode(), _fake_ops():
        q, k, v, do = (torch.empty(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
                       for h in (hq, hkv, hkv, hq))
        for kind in KINDS:
            causal = kind.startswith("causal")
            mask = None
            if "padded" in kind:
                mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device="cuda")
            want = "cuda_flash" if mask is None and dtype != torch.float32 else "cuda_efficient"
            assert kernels.pick_backend("auto", q, mask, causal).name == want
            for name in ("cuda_flash", "cuda_efficient", "cuda_cudnn"):
                if not kernels_cuda.supports(name, "cuda", dtype, mask is not None, causal, d):
                    continue
                be = kernels.BACKENDS[name]
                out, lse = be.forward(q, k, v, 0.125, causal, mask)
                assert out.shape == q.shape and out.dtype == dtype and out.is_cuda, name
                assert lse.shape == (b, hq, s) and lse.dtype == torch.float32, (name, lse.shape)
                dq, dk, dv = be.backward(do, q, k, v, out.float(), lse, 0.125, causal, mask)
                for g, x in zip((dq, dk, dv), (q, k, v)):  # GQA: dK/dV keep hkv heads
                    assert g.shape == x.shape and g.dtype == dtype, (name, kind, g.shape)


def _meta_kind(x):
    return "cuda" if x.device.type == "meta" else x.device.type


@pytest.mark.parametrize("method", msp.METHODS)
def test_every_method_on_the_cuda_plan_with_meta_tensors(method, monkeypatch):
    """Forward and backward through ``msp.attention`` at P=1 with the CUDA dispatch: no host
    read happens (it would raise on meta tensors), the gradients come back in the inputs'
    shapes and dtypes, and each block runs the kernel the dispatch table names."""
    used = []
    pick = kernels.pick_backend
    monkeypatch.setattr(kernels, "device_kind", _meta_kind)
    monkeypatch.setattr(kernels, "pick_backend",
                        lambda *a, **k: used.append(pick(*a, **k).name) or pick(*a, **k))
    b, s, hq, hkv, d = 2, 256, 8, 2, 64
    with _fake_ops():
        for dtype in (torch.bfloat16, torch.float32):
            for causal, pad, hint in ((True, False, None), (False, True, None),
                                      (False, True, ((),)), (True, True, (((0, 8),),))):
                used.clear()
                q, k, v = (torch.empty(b, s, h, d, device="meta", dtype=dtype,
                                       requires_grad=True) for h in (hq, hkv, hkv))
                kpm = torch.empty(b, s, dtype=torch.bool, device="meta") if pad else None
                out = msp.attention(q, k, v, method=method, causal=causal,
                                    key_padding_mask=kpm, key_padding_ranges=hint)
                out.backward(torch.empty_like(out))
                assert out.shape == q.shape and out.dtype == dtype
                for x in (q, k, v):
                    assert x.grad.shape == x.shape and x.grad.dtype == dtype
                if method == "rsa":  # materialises its rows: no block kernel
                    assert not used
                    continue
                flash = "cuda_flash" if dtype == torch.bfloat16 else "cuda_efficient"
                # unpadded, or padded with a hint saying where: the flash kernel for what the
                # padding misses; padded without a hint: every block masked
                if pad and hint is None:
                    assert set(used) == {"cuda_efficient"}, used
                elif pad and hint[0]:
                    assert set(used) == {"cuda_efficient", flash} or \
                        set(used) == {"cuda_efficient"}, used
                else:
                    assert set(used) == {flash}, used


def test_rsa_on_cuda_batches_each_block():
    """At S=32K, P=4, 32 query / 8 kv heads (b=1): the CPU's cache tiles would be ~16K tiles
    of ~6 kernels per layer forward (~100K launches) and as many backward; on CUDA each
    needed block is one batched call forward, and the backward's row slices are bounded by
    ``CUDA_TILE_ELEMS``."""
    for causal, layout in ((True, "zigzag"), (False, "contiguous")):
        worst = {"cpu": 0, "cuda": 0}
        for r in range(4):
            setup = Setup(None, r, 4, causal, 1.0, layout, rsa.Options(), None)
            cpu = rsa.kernel_calls(setup, 8192, 1, 32, 8, "cpu")
            cuda = rsa.kernel_calls(setup, 8192, 1, 32, 8, "cuda")
            assert cuda["forward"] == cuda["blocks"] <= 18  # one batched call per block
            assert cuda["backward"] <= 128
            worst = {"cpu": max(worst["cpu"], cpu["forward"]),
                     "cuda": max(worst["cuda"], cuda["forward"] + cuda["backward"])}
        assert worst["cpu"] > 16000  # what the CPU tiling would launch on a GPU
        assert worst["cuda"] <= 146


TOL = 1e-5  # fp32 inputs, float64 emulated kernels: fp32 rounding of outputs and merges


def _cuda_plan_matrix(rank, world, method):
    failures, ran = [], []
    for layout in SEQUENCE_LAYOUTS:
        for causal, pad in ((True, False), (False, True), (True, True)):
            S = 16 * world
            kpm = None
            if pad:  # right padding inside the last chunk: some ranks' keys hold none
                kpm = torch.zeros(2, S, dtype=torch.bool)
                kpm[0, S - S // 8:] = True
                kpm[1, S - 2:] = True
            shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout)  # noqa: B023

            def call(q, k, v, kpm_local):
                return msp.attention(q, k, v, method=method, causal=causal,  # noqa: B023
                                     layout=layout, key_padding_mask=kpm_local)  # noqa: B023

            with cuda_plan_on_cpu() as used:
                errs = check_sharded(call, shard, b=2, S=S, hq=4, hkv=2, d=8, seed=world,
                                     causal=causal, kpm=kpm, dtype=torch.float32)[0]
            ran.append((layout, causal, pad, dict(used)))
            if max(errs) > TOL:
                failures.append(f"{layout} causal={causal} pad={pad}: {errs}")
    return failures, ran


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", msp.METHODS)
def test_the_cuda_plan_is_exact_and_padding_free_blocks_run_flash(method, world):
    results = run_on_ranks(_cuda_plan_matrix, world, method)
    bad = [f"rank {r}: {f}" for r, (fs, _) in enumerate(results) for f in fs]
    assert not bad, "\n".join(bad)
    if method == "rsa":
        return
    for case in zip(*(ran for _, ran in results)):  # one case, every rank's blocks
        (layout, causal, pad, _), used = case[0], Counter()
        for *_, u in case:
            used.update(u)
        assert used["cuda_flash"] > 0, (layout, causal, pad, used)
        if pad:  # some keys padded: those blocks masked, the rest flash
            assert used["cuda_efficient"] > 0, (layout, causal, pad, used)


def _rsa_cuda_tiles_exact(rank, world):
    from test_attention_exact import exact_matrix

    saved = rsa.CUDA_TILE_ELEMS
    rsa.CUDA_TILE_ELEMS = 96  # several row slices per block
    try:
        with cuda_plan_on_cpu():
            return exact_matrix(rank, world, "rsa", "zigzag")
    finally:
        rsa.CUDA_TILE_ELEMS = saved


@pytest.mark.parametrize("world", [1, 3])
def test_rsa_cuda_tiling_is_exact_in_float64(world):
    failures = run_on_ranks(_rsa_cuda_tiles_exact, world)
    bad = [f"rank {r}: {f}" for r, fs in enumerate(failures) for f in fs]
    assert not bad, "\n".join(bad)
