"""RSA, Ring Self-Attention (Li et al., ACL 2023): two rings, K then V.

Forward: K chunks travel the ring ``r -> r+1`` ``P-1`` times; each rank fills its full score
rows ``[s, S]`` (columns in rank order), masks them by global position and key padding, takes
an exact softmax locally, then V chunks travel the same ring to accumulate ``softmax · V``.
Backward: the V ring gives ``dP_j = dO·V_jᵀ`` and the partial ``dV_j = P_jᵀ·dO``; the softmax
backward ``dS = P∘(dP - δ)`` uses ``δ = rowsum(dO∘O)`` (equal to ``rowsum(dP∘P)``) and
overwrites the probabilities block by block; the K ring gives ``dQ += dS_j·K_j`` and the
partial ``dK_j = dS_jᵀ·Q``. Partials go straight back to their owner ``j`` (one send each),
overlapped with the next block.

Memory per rank: the score/probability rows ``b·hq·s·S`` in the accumulation dtype, kept for
the backward. That quadratic term is the method, kept faithfully; the other methods exist to
avoid it. Sent per rank, forward: ``(P-1)·s·b·hkv·D`` for each of K and V; backward: the same
again plus ``(P-1)·s·b·hkv·D`` partials of dK and of dV (accumulation dtype).

``colossalai_compat=True`` reproduces ColossalAI's original gradients, which all-reduce
full-length dK/dV and divide dQ, dK, dV by ``P`` (not the exact gradient; off by default).
The block-kernel ``backend`` option does not apply: RSA materialises its score rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_seqpar.api import BaseOptions
from megatron_seqpar.common import run_method
from megatron_seqpar.kernels import acc_dtype
from megatron_seqpar.layouts import documents, positions


@dataclass(frozen=True)
class Options(BaseOptions):
    """``colossalai_compat``: scale gradients by 1/P like ColossalAI's original RSA."""

    colossalai_compat: bool = False


def _ring(comm, own: torch.Tensor, visit):
    """Pass ``own`` around the ring; ``visit(j, chunk)`` sees every rank ``j``'s chunk once.

    The next chunk's transfer is in flight while ``visit`` runs. ``visit`` may return
    ``(partial, j)`` sends for ``j``'s owner; they are posted with the matching receives of
    this rank's own partials and summed into the returned list (one per step).
    """
    P, r = comm.world_size, comm.rank
    own = own.contiguous()  # transfers need dense buffers (RSA's own copy: 1/P of its rows)
    cur, j = own, r
    bufs = [torch.empty_like(own), torch.empty_like(own)] if P > 1 else []
    returned = []
    for t in range(P):
        pending = (comm.post([(cur, (r + 1) % P)], [(bufs[t % 2], (r - 1) % P)])
                   if t < P - 1 else None)
        partial = visit(j, cur)
        if partial is not None and j != r:
            recv = partial.new_empty(partial.shape)  # dense, whatever the partial's strides
            back = comm.post([(partial, j)], [(recv, (r + t) % P)])
            returned.append((back, recv, partial))
        elif partial is not None:
            returned.append((None, partial, None))
        if pending is not None:
            pending.wait()
            cur, j = bufs[t % 2], (j - 1) % P
    total = None
    for back, recv, _ in returned:
        if back is not None:
            back.wait()
        total = recv.clone() if total is None else total.add_(recv)
    return total


def _mask(setup, s, kpm_all, device):
    """``[b|1, 1, 1, s, S]`` bool, True = masked (later positions when causal, other packed
    sequences, padded keys), columns in rank order."""
    q_runs = setup.runs(setup.rank, s)
    k_runs = [setup.runs(j, s) for j in range(setup.world_size)]
    qp, kp = positions(q_runs, device), torch.cat([positions(r, device) for r in k_runs])
    mask = (kp[None, :] > qp[:, None]) if setup.causal else torch.zeros(
        len(qp), len(kp), dtype=torch.bool, device=device)
    if setup.cu_seqlens is not None:  # packed: a query sees only its own sequence's keys
        qd, kd = documents(q_runs, device), torch.cat([documents(r, device) for r in k_runs])
        mask |= kd[None, :] != qd[:, None]
    mask = mask.view(1, 1, 1, len(qp), len(kp))
    if kpm_all is not None:
        pad = kpm_all.permute(1, 0, 2).reshape(kpm_all.size(1), 1, 1, 1, -1)
        mask = mask | pad
    return mask


def rsa_forward(setup, q, k, v, kpm_all):
    comm, s = setup.comm(), q.size(2)
    b, hq, _, d = q.shape
    hkv = k.size(1)
    cd = acc_dtype(q.dtype)
    qg = q.to(cd).reshape(b, hkv, hq // hkv, s, d)
    probs = torch.empty(b, hkv, hq // hkv, s, setup.world_size * s, dtype=cd, device=q.device)

    def scores(j, k_j):
        probs[..., j * s:(j + 1) * s] = torch.matmul(qg, k_j.to(cd).unsqueeze(2).transpose(-1, -2))

    _ring(comm, k, scores)
    probs.mul_(setup.scale).masked_fill_(_mask(setup, s, kpm_all, q.device), float("-inf"))
    lse = torch.logsumexp(probs, dim=-1)
    probs.sub_(lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)).exp_()
    out = torch.zeros(b, hkv, hq // hkv, s, d, dtype=cd, device=q.device)

    def context(j, v_j):
        out.add_(torch.matmul(probs[..., j * s:(j + 1) * s], v_j.to(cd).unsqueeze(2)))

    _ring(comm, v, context)
    if setup.traffic:
        setup.traffic.add_block_steps(setup.world_size)
    return out.view(b, hq, s, d), lse.view(b, hq, s), (probs,)


def rsa_backward(setup, dout, q, k, v, out, lse, kpm_all, probs):
    comm, s = setup.comm(), q.size(2)
    b, hq, _, d = q.shape
    hkv = k.size(1)
    cd = probs.dtype
    do = dout.to(cd).reshape(b, hkv, hq // hkv, s, d)
    delta = (do * out.to(cd).reshape_as(do)).sum(-1, keepdim=True)  # = rowsum(dP∘P)
    qg = q.to(cd).reshape_as(do)

    def grad_v(j, v_j):  # dV_j partial; dS_j overwrites P_j (P_j is not needed afterwards)
        p = probs[..., j * s:(j + 1) * s]
        dv_j = torch.matmul(p.transpose(-1, -2), do).sum(2)
        dp = torch.matmul(do, v_j.to(cd).unsqueeze(2).transpose(-1, -2))
        p.mul_(dp.sub_(delta)).mul_(setup.scale)
        return dv_j

    dv = _ring(comm, v, grad_v)
    dq = torch.zeros_like(qg)

    def grad_k(j, k_j):
        ds = probs[..., j * s:(j + 1) * s]
        dq.add_(torch.matmul(ds, k_j.to(cd).unsqueeze(2)))
        return torch.matmul(ds.transpose(-1, -2), qg).sum(2)

    dk = _ring(comm, k, grad_k)
    dq = dq.view(b, hq, s, d)
    if setup.options.colossalai_compat:
        for g in (dq, dk, dv):
            g.div_(setup.world_size)
    return dq, dk, dv


def apply(q, k, v, key_padding_mask, setup):
    return run_method(rsa_forward, rsa_backward, q, k, v, key_padding_mask, setup)
