"""What every method shares: the thin autograd wrapper and the key-padding-mask gather.

A method provides two free functions over ``[b, h, s, d]`` tensors:

    forward(setup, q, k, v, kpm_all) -> (out, lse, extra_saved_tuple)
    backward(setup, dout, q, k, v, out, lse, kpm_all, *extra_saved) -> (dq, dk, dv)

``out``/``lse`` are in the accumulation dtype; ``kpm_all`` is ``[P, b, s]`` (every rank's key
padding mask, gathered once: ``P·b·s`` bytes) or None. The wrapper passes ``[b, h, s, d]``
*views* of the public ``[b, s, h, d]`` tensors (no copies), saves ``q, k, v, out (q's dtype),
lse`` plus the method's extras, and runs the hand-written backward: autograd never sees the
communication.
"""

from __future__ import annotations

import torch


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


class _SeqParFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, setup, fwd, bwd):
        qh, kh, vh = to_bhsd(q), to_bhsd(k), to_bhsd(v)
        kpm_all = gather_kpm(setup.comm(), kpm)
        out, lse, extra = fwd(setup, qh, kh, vh, kpm_all)
        out = out.to(q.dtype)
        ctx.setup, ctx.bwd, ctx.n_extra = setup, bwd, len(extra)
        ctx.save_for_backward(qh, kh, vh, out, lse, kpm_all, *extra)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse, kpm_all, *extra = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(ctx.setup, to_bhsd(dout), qh, kh, vh, out, lse, kpm_all, *extra)
        grads = [g.to(x.dtype).transpose(1, 2) for g, x in ((dq, qh), (dk, kh), (dv, vh))]
        return (*grads, None, None, None, None)


def run_method(fwd, bwd, q, k, v, kpm, setup):
    """Apply a method's forward/backward pair as one differentiable op (public layout)."""
    return _SeqParFunction.apply(q, k, v, kpm, setup, fwd, bwd)
