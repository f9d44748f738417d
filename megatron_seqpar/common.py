"""What every method shares: the thin autograd wrapper and the key-padding-mask gather.

A method provides two free functions over ``[b, h, s, d]`` tensors:

    forward(setup, q, k, v, kpm_all) -> (out, lse, extra_saved_tuple)
    backward(setup, dout, q, k, v, out, lse, kpm_all, *extra_saved) -> (dq, dk, dv)

``out``/``lse`` are in the accumulation dtype; ``kpm_all`` is ``[P, b, s]`` (every rank's key
padding mask, gathered once: ``P·b·s`` bytes) or None. The wrapper passes ``[b, h, s, d]``
*views* of the public ``[b, s, h, d]`` tensors (no copies), saves ``q, k, v, out (q's dtype),
lse`` plus the method's extras, and runs the hand-written backward: autograd never sees the
communication.

Softmax sinks (``softmax_offset``, one logit ``o_h`` per query head) are applied here, once,
to the method's merged ``(out, lse)``: ``lse' = logaddexp(lse, o_h)``, ``out' = out ·
exp(lse - lse')``. The methods' backwards take the rows' final ``out'``/``lse'``, which is
all the block kernels need (``dS = P∘(dP - rowsum(dO∘O'))`` with ``P = exp(S - lse')``; the
sink holds no value), and ``d o_h = -Σ_rows exp(o_h - lse')·rowsum(dO∘O')``. No collective.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_seqpar import headpar
from megatron_seqpar.hostread import true_runs


def gather_kpm(comm, kpm):
    """``[P, b, s]`` bool: every rank's key padding mask (None when there is none)."""
    if kpm is None:
        return None
    return comm.all_gather(kpm.to(torch.uint8)).bool()


def to_bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` -> ``[b, h, s, d]`` as a view (no copy): the kernels take strided
    inputs, and what is sent goes in the public layout (``public``)."""
    return x.transpose(1, 2)


def public(x: torch.Tensor) -> torch.Tensor:
    """The contiguous ``[b, s, h, d]`` storage behind a ``to_bhsd`` view (copied only if the
    caller's tensor was not contiguous): what P2P transfers send."""
    return x.transpose(1, 2).contiguous()


def to_outer(setup, q, k, v, kpm):
    """Two levels: ONE head all-to-all over the inner group (K/V heads repeated first when
    ``U`` does not divide them) and the key padding mask gathered over it."""
    inner, U = setup.inner_comm(), setup.head_parallel
    hkv = headpar.kv_heads(q.size(2), k.size(2), U)
    if hkv != k.size(2):
        k, v = (x.repeat_interleave(hkv // x.size(2), dim=2) for x in (k, v))
    q, k, v = headpar.scatter_heads(inner, [q, k, v])
    if kpm is not None:
        kpm = inner.all_gather(kpm.to(torch.uint8)).bool()  # [U, b, s]
        kpm = kpm.transpose(0, 1).reshape(kpm.size(1), -1)
    return q, k, v, kpm


def from_outer(setup, dq, dk, dv, hkv):
    """Two levels, backward: ONE all-to-all of the packed gradients; repeated K/V heads'
    gradients summed back to the ``hkv`` heads."""
    dq, dk, dv = headpar.gather_heads(setup.inner_comm(), [dq, dk, dv])
    if dk.size(2) != hkv:
        b, s, h, d = dk.shape
        dk, dv = (x.view(b, s, hkv, h // hkv, d).sum(3) for x in (dk, dv))
    return dq, dk, dv


def out_to_inner(setup, out):
    """Two levels: the output ``[b, U*s, hq/U, D]`` back to ``[b, s, hq, D]`` (one
    all-to-all)."""
    return headpar.gather_heads(setup.inner_comm(), [out])[0]


def dout_to_outer(setup, dout):
    """Two levels, backward: the incoming gradient to the method's ``[b, U*s, hq/U, D]``."""
    return headpar.scatter_heads(setup.inner_comm(), [dout])[0]


def _local_offset(setup, offset, heads: int):
    """The sink logits of the method's ``heads`` (two levels: inner rank ``u`` holds query
    head group ``u``)."""
    if setup.head_parallel == 1:
        return offset
    u = setup.inner_comm().rank
    return offset[u * heads:(u + 1) * heads]


def sink_forward(setup, out, lse, offset):
    """Apply the sinks to the merged ``(out, lse)`` in place (``[b, h, s, d]``, ``[b, h, s]``,
    accumulation dtype): a row without a visible key keeps ``out = 0`` and gets ``lse' =
    o_h``."""
    o = _local_offset(setup, offset, lse.size(1)).to(lse.dtype).view(1, -1, 1)
    new = torch.logaddexp(lse, o.expand_as(lse))
    out.mul_(torch.exp(lse - new).unsqueeze(-1))
    lse.copy_(new)


def sink_grad(setup, dout, out, lse, offset):
    """``d softmax_offset`` ``[hq]`` (offset's dtype) from this rank's rows: ``dout``/``out``
    ``[b, h, s, d]`` in the method's layout, ``lse`` the final one."""
    o = _local_offset(setup, offset, lse.size(1)).to(lse.dtype).view(1, -1, 1)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    part = -(torch.exp(o - lse) * delta).sum((0, 2))
    grad = torch.zeros(offset.shape, dtype=lse.dtype, device=offset.device)
    h = part.numel()
    u = 0 if setup.head_parallel == 1 else setup.inner_comm().rank
    grad[u * h:(u + 1) * h] = part
    return grad.to(offset.dtype)


def run_forward(setup, fwd, q, k, v, kpm, offset=None):
    """The forward steps every call shares, plain and under recompute (``megatron.
    checkpointing``): two levels' head all-to-all, the key padding gathered and, for CPU
    tensors, its padded ranges read on the host (free there; on CUDA only the caller's hint in
    ``setup.key_pads`` is used: no sync), then the method's forward and the sinks (``offset``).

    Returns ``(setup, (qh, kh, vh), out, lse, kpm_all, extra)``: the setup the backward must
    get, the ``[b, h, s, d]`` views, ``out`` ``[b, h, s, d]`` in q's dtype."""
    qkv, kpm = method_views(setup, q, k, v, kpm)
    kpm_all = gather_kpm(setup.comm(), kpm)
    if kpm_all is not None and kpm_all.device.type == "cpu":
        pads = tuple(true_runs(kpm_all[j]) for j in range(kpm_all.size(0)))
        setup = dataclasses.replace(setup, key_pads=pads)
    out, lse, extra = fwd(setup, *qkv, kpm_all)
    if offset is not None:
        sink_forward(setup, out, lse, offset.detach())
    return setup, qkv, out.to(q.dtype), lse, kpm_all, tuple(extra)


def method_views(setup, q, k, v, kpm=None):
    """The caller's ``[b, s, h, d]`` shards as the method's ``[b, h, s, d]`` views (two levels:
    after the head all-to-all), and the key padding that goes with them."""
    if setup.head_parallel > 1:
        q, k, v, kpm = to_outer(setup, q, k, v, kpm)
    return (to_bhsd(q), to_bhsd(k), to_bhsd(v)), kpm


def run_backward(setup, bwd, dout, qkv, out, lse, kpm_all, extra, dtypes, hkv, offset=None):
    """The backward steps every call shares, plain and under recompute: dO to the method's
    layout, the method's backward, the gradients back to the caller's layout and dtypes.
    Returns ``[dq, dk, dv, d offset (None without sinks)]``."""
    if setup.head_parallel > 1:
        dout = dout_to_outer(setup, dout)
    dq, dk, dv = bwd(setup, to_bhsd(dout), *qkv, out, lse, kpm_all, *extra)
    doff = None if offset is None else sink_grad(setup, to_bhsd(dout), out, lse, offset)
    grads = [g.transpose(1, 2) for g in (dq, dk, dv)]
    if setup.head_parallel > 1:
        grads = from_outer(setup, *grads, hkv)
    return [*(g.to(t) for g, t in zip(grads, dtypes)), doff]


def public_out(setup, out):
    """The method's ``[b, h, s, d]`` output as the caller's ``[b, s, h, d]`` shard."""
    out = out.transpose(1, 2)
    return out_to_inner(setup, out) if setup.head_parallel > 1 else out


class _SeqParFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offset, kpm, setup, fwd, bwd):
        ctx.dtypes, ctx.hkv = (q.dtype, k.dtype, v.dtype), k.size(2)
        setup, (qh, kh, vh), out, lse, kpm_all, extra = run_forward(setup, fwd, q, k, v, kpm,
                                                                    offset)
        ctx.setup, ctx.bwd, ctx.n_extra = setup, bwd, len(extra)
        ctx.save_for_backward(qh, kh, vh, out, lse, offset, kpm_all, *extra)
        return public_out(setup, out)

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse, offset, kpm_all, *extra = ctx.saved_tensors
        dq, dk, dv, doff = run_backward(ctx.setup, ctx.bwd, dout, (qh, kh, vh), out, lse,
                                        kpm_all, extra, ctx.dtypes, ctx.hkv, offset)
        return dq, dk, dv, doff, None, None, None, None


def run_method(fwd, bwd, q, k, v, kpm, setup, offset=None):
    """Apply a method's forward/backward pair as one differentiable op (public layout); with
    ``setup.head_parallel > 1`` the head all-to-alls of ``headpar`` wrap it; ``offset``: the
    softmax sinks ``[hq]`` or None."""
    return _SeqParFunction.apply(q, k, v, offset, kpm, setup, fwd, bwd)
