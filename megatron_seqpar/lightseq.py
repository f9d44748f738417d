"""LightSeq (DistAttn, Li et al. 2023): direct P2P of K/V shards overlapped with block compute.

Schedule. Step 0 is the local block. At step ``t`` rank ``r`` sends its *own* K/V straight to
rank ``r+t`` (no ring forwarding) and attends its queries to the K/V received from ``r-t``;
partial results are merged in fp32 by log-sum-exp. Transfers of step ``t+1`` are posted before
step ``t``'s compute (step 1's before the local block; two alternating receive buffers), and
waited on only when needed.

Causal load balancing (contiguous layout, ``balance=True``). Only blocks ``(q_i, kv_j)`` with
``j <= i`` are needed, so rank ``P-1`` would compute ``P`` blocks while rank 0 computes one. For
``t = 1..floor(P/2)`` rank ``r`` pairs with ``c = (r+t) mod P``: if ``r+t < P`` it sends K/V to
``c`` (``c`` needs them), otherwise it sends its Q to ``c``, which attends it to its own K/V and
returns ``(out, lse)``. Every needed block is computed exactly once and every rank computes at
most ``floor(P/2) + 1`` blocks (odd ``P`` included; for even ``P`` the last step is half busy).
With ``balance=False`` the unbalanced schedule sends K/V only where it is needed. The zigzag
layout is balanced by itself, and bidirectional attention needs every block: both use
``P - 1`` K/V steps.

Per rank and call (elements; ``s`` local length, ``b`` batch): forward sends
``2·s·b·hkv·D`` per K/V step, or ``s·b·hq·D`` (Q) per Q-shipping step, whose helper returns
``s·b·hq·D`` (out, accumulation dtype) plus ``s·b·hq`` (lse). The backward re-sends K/V (or Q
with dO, O and lse) and returns dK/dV to their owner (dQ to the Q owner) in the accumulation
dtype. Memory: q, k, v, out, lse saved; two K/V (or Q) receive buffers in flight. Every
receive buffer is allocated once per call; on CUDA the transfers run on the communicator's
side stream (``comm``), so step ``t+1``'s transfer is in flight while step ``t`` computes, and
no step synchronises with the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_seqpar.common import public
from megatron_seqpar.kernels import attend, attend_backward, cut_key_pad, kv_range, merge_
from megatron_seqpar.layouts import slice_runs
from megatron_seqpar.method import BaseOptions, Method


@dataclass(frozen=True)
class Options(BaseOptions):
    """``balance``: causal load balancing for the contiguous layout (LightSeq's schedule)."""

    balance: bool = True


class Step(NamedTuple):
    kv_to: int | None  # send own K/V to this rank
    kv_from: int | None  # receive K/V from this rank, attend own queries to it
    q_to: int | None  # send own queries to this rank, get (out, lse) back
    q_from: int | None  # receive queries from this rank, attend them to own K/V, return


def schedule(world_size: int, rank: int, *, causal: bool, layout: str, balance: bool,
             needed=None):
    """The steps after the local block, for ``rank`` (the same rule on every rank).

    ``needed(i, j)``: whether rank ``i``'s queries see any of rank ``j``'s keys (None: all
    pairs, as for one unpacked sequence in the zigzag or bidirectional case). A transfer
    whose block would be empty (packed sequences that do not reach across) is left out on
    both sides, so a whole empty step sends nothing.
    """
    P, r = world_size, rank
    need = needed or (lambda i, j: True)
    ordered = causal and layout == "contiguous"
    if not (ordered and balance):
        steps = []
        for t in range(1, P):
            to, frm = (r + t) % P, (r - t) % P
            if ordered:  # blocks of later ranks' keys are fully masked: skip those transfers
                to, frm = (to if r + t < P else None), (frm if r - t >= 0 else None)
            steps.append(Step(to if to is not None and need(to, r) else None,
                              frm if frm is not None and need(r, frm) else None, None, None))
        return steps
    steps = []
    for t in range(1, P // 2 + 1):
        half = 2 * t == P  # for even P the pair {r, r+P/2} appears twice: K/V side only
        send_kv, recv_kv = r + t < P, r - t >= 0
        to, frm = (r + t) % P, (r - t) % P
        steps.append(Step(
            kv_to=to if send_kv and need(to, r) else None,
            kv_from=frm if recv_kv and need(r, frm) else None,
            q_to=to if not send_kv and not half and need(r, to) else None,
            q_from=frm if not recv_kv and not half and need(frm, r) else None,
        ))
    return steps


def _steps(setup, s):
    """The schedule of this call; with packed sequences, two levels or a window, transfers of
    empty blocks are left out (``needed`` from the block planner, the same on every rank)."""
    needed = None
    if setup.cu_seqlens is not None or setup.head_parallel > 1 or setup.window is not None:
        needed = lambda i, j: setup.sees(i, j, s)
    return schedule(setup.world_size, setup.rank, causal=setup.causal, layout=setup.layout,
                    balance=setup.options.balance, needed=needed)


def _slots(steps, attr):
    """Receive-buffer slot of each step for ``attr`` (alternating among the steps that
    receive), and how many slots are needed (0, 1 or 2)."""
    slots, n = [], 0
    for st in steps:
        slots.append(n % 2 if getattr(st, attr) is not None else None)
        n += getattr(st, attr) is not None
    return slots, min(n, 2)


def _finish_returns(returns, consume):
    if returns is None:
        return
    pending, bufs, _keep_alive = returns
    pending.wait()
    if bufs:
        consume(bufs)


def _spans(setup, runs):
    """``span(i, j)``: ``kv_range`` of rank ``i``'s queries against rank ``j``'s keys, each
    pair computed once per call (posts, computes and returns all read it)."""
    return functools.cache(lambda i, j: kv_range(runs(i), runs(j), setup.causal, setup.window))


def _first(buf: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens' worth of a public ``[b, s, h, d]`` buffer, as a contiguous
    ``[b, n, h, d]`` (a receive buffer for a part of a shard)."""
    b, _, h, d = buf.shape
    return buf.view(-1)[:b * n * h * d].view(b, n, h, d)


def lightseq_forward(setup, q, k, v, kpm_all):
    """Forward over ``[b, h, s, d]`` views: ``(out, lse, ())`` in the accumulation dtype.

    K, V and Q travel in their public ``[b, s, h, d]`` storage (no packing copies); K/V
    receive buffers: one per receiving step, two at most.
    """
    comm, r, s = setup.comm(), setup.rank, q.size(2)
    kw = dict(scale=setup.scale, **setup.mask, backend=setup.options.backend)
    runs = lambda i: setup.runs(i, s)
    kpm = lambda i: setup.key_pad(kpm_all, i)
    tally = setup.traffic.add_block_steps if setup.traffic else (lambda n=1: None)
    span = _spans(setup, runs)

    steps = _steps(setup, s)
    kv_slot, n_kv = _slots(steps, "kv_from")
    q_slot, n_q = _slots(steps, "q_from")
    own_k, own_v = public(k), public(v)
    own_q = public(q) if any(st.q_to is not None for st in steps) else None
    kv_buf = [(torch.empty_like(own_k), torch.empty_like(own_v)) for _ in range(n_kv)]
    q_buf = [q.new_empty(q.transpose(1, 2).shape) for _ in range(n_q)]
    # returned (out, lse) land here, step after step: a step's returns are merged before the
    # next step posts its receives, so one set per call suffices (made at first use, so it is
    # not alive during the steps before)
    ret_buf = []

    def post(t):
        st = steps[t]
        sends, recvs = [], []
        if st.kv_to is not None:  # the part of our K/V that rank kv_to's blocks read
            lo, hi = span(st.kv_to, r)
            sends += [(own_k[:, lo:hi], st.kv_to), (own_v[:, lo:hi], st.kv_to)]
        sends += [(own_q, st.q_to)] if st.q_to is not None else []
        if st.kv_from is not None:
            lo, hi = span(r, st.kv_from)
            recvs += [(_first(b, hi - lo), st.kv_from) for b in kv_buf[kv_slot[t]]]
        recvs += [(q_buf[q_slot[t]], st.q_from)] if st.q_from is not None else []
        return comm.post(sends, recvs)

    def merge_home(bufs):  # our queries' (out, lse) against a later rank's K/V, public layout
        merge_(out, lse, bufs[0].transpose(1, 2), bufs[1])

    pending = post(0) if steps else None  # in flight while the local block computes
    out, lse = attend(q, runs(r), k, v, runs(r), kpm=kpm(r), **kw)
    tally(setup.sees(r, r, s))
    returns = None  # (Pending, recv buffers or None, tensors kept alive) of the last step
    for t, st in enumerate(steps):
        nxt = post(t + 1) if t + 1 < len(steps) else None
        pending.wait()
        sends, recvs = [], []
        if st.kv_from is not None:
            lo, hi = span(r, st.kv_from)
            kb, vb = (_first(x, hi - lo).transpose(1, 2) for x in kv_buf[kv_slot[t]])
            o, lb = attend(q, runs(r), kb, vb, slice_runs(runs(st.kv_from), lo, hi),
                           kpm=cut_key_pad(kpm(st.kv_from), lo, hi), **kw)
            merge_(out, lse, o, lb)
            tally(setup.sees(r, st.kv_from, s))
        if st.q_from is not None:
            qa = q_buf[q_slot[t]].transpose(1, 2)
            o, lb = attend(qa, runs(st.q_from), k, v, runs(r), kpm=kpm(r), **kw)
            sends += [(public(o), st.q_from), (lb, st.q_from)]
            tally(setup.sees(st.q_from, r, s))
        if st.q_to is not None:
            ret_buf = ret_buf or [torch.empty_like(public(out)), torch.empty_like(lse)]
            recvs += [(ret_buf[0], st.q_to), (ret_buf[1], st.q_to)]
        _finish_returns(returns, merge_home)
        returns = (comm.post(sends, recvs), [b for b, _ in recvs], sends)
        pending = nxt
    _finish_returns(returns, merge_home)
    return out, lse, ()


def lightseq_backward(setup, dout, q, k, v, out, lse, kpm_all):
    """Backward mirroring the forward schedule: ``(dq, dk, dv)`` in the accumulation dtype."""
    comm, r, s = setup.comm(), setup.rank, q.size(2)
    kw = dict(scale=setup.scale, **setup.mask, backend=setup.options.backend)
    runs = lambda i: setup.runs(i, s)
    kpm = lambda i: setup.key_pad(kpm_all, i)
    span = _spans(setup, runs)

    steps = _steps(setup, s)
    kv_slot, n_kv = _slots(steps, "kv_from")
    q_slot, n_q = _slots(steps, "q_from")
    own_k, own_v = public(k), public(v)
    own_q = ([public(q), public(dout.to(q.dtype)), public(out.to(q.dtype)), lse]
             if any(st.q_to is not None for st in steps) else [])
    kv_buf = [(torch.empty_like(own_k), torch.empty_like(own_v)) for _ in range(n_kv)]
    # Q-side receive buffers [q, dO, O (q's dtype), lse]: made from shapes, not from copies
    pub, pub_v = q.transpose(1, 2).shape, out.transpose(1, 2).shape  # MLA: V's head dim
    q_buf = [[q.new_empty(pub), q.new_empty(pub_v), q.new_empty(pub_v), torch.empty_like(lse)]
             for _ in range(n_q)]
    # returned partials (dK/dV to us as K/V owner, or dQ as Q owner): in the step's own K/V
    # receive slot when the dtypes agree (it is free once the step has computed), else one
    # set per call, made at first use, as in the forward
    kv_ret, q_ret = [], []

    def post(t):
        st = steps[t]
        sends, recvs = [], []
        if st.kv_to is not None:
            lo, hi = span(st.kv_to, r)
            sends += [(own_k[:, lo:hi], st.kv_to), (own_v[:, lo:hi], st.kv_to)]
        sends += [(x, st.q_to) for x in own_q] if st.q_to is not None else []
        if st.kv_from is not None:
            lo, hi = span(r, st.kv_from)
            recvs += [(_first(b, hi - lo), st.kv_from) for b in kv_buf[kv_slot[t]]]
        recvs += [(b, st.q_from) for b in q_buf[q_slot[t]]] if st.q_from is not None else []
        return comm.post(sends, recvs)

    def consume(bufs):  # partials arrive in the public layout, for keys [lo, lo + n)
        for kind, lo, buf in bufs:
            grad = {"q": dq, "k": dk, "v": dv}[kind]
            grad[:, :, lo:lo + buf.size(1)].add_(buf.transpose(1, 2))

    pending = post(0) if steps else None  # in flight while the local block computes
    dq, dk, dv = attend_backward(dout, q, runs(r), k, v, runs(r), out, lse, kpm=kpm(r), **kw)
    returns = None
    for t, st in enumerate(steps):
        # the last step's returns first: they may sit in the K/V slot the next post reuses,
        # and its partials are freed before this step's exist
        _finish_returns(returns, consume)
        returns = None
        nxt = post(t + 1) if t + 1 < len(steps) else None
        pending.wait()
        sends, recvs = [], []
        if st.kv_from is not None:
            lo, hi = span(r, st.kv_from)
            kb, vb = (_first(x, hi - lo).transpose(1, 2) for x in kv_buf[kv_slot[t]])
            _, dkp, dvp = attend_backward(dout, q, runs(r), kb, vb,
                                          slice_runs(runs(st.kv_from), lo, hi), out, lse,
                                          kpm=cut_key_pad(kpm(st.kv_from), lo, hi), dq=dq, **kw)
            # dK/dV partials go home in the public layout, where the kernel's output is dense
            sends += [(public(dkp), st.kv_from), (public(dvp), st.kv_from)]
            del dkp, dvp  # only the in-flight sends keep them: freed once settled
        if st.q_from is not None:
            qa, doa, oa, la = q_buf[q_slot[t]]
            g = attend_backward(doa.transpose(1, 2), qa.transpose(1, 2), runs(st.q_from), k, v,
                                runs(r), oa.transpose(1, 2), la, kpm=kpm(r), dk=dk, dv=dv, **kw)
            sends.append((public(g[0]), st.q_from))
            del g
        if st.kv_to is not None:
            if st.kv_from is not None and own_k.dtype == dk.dtype:
                ret = kv_buf[kv_slot[t]]  # this step's K/V are used up: returns land there
            else:
                kv_ret = kv_ret or [dk.new_empty(own_k.shape), dv.new_empty(own_v.shape)]
                ret = kv_ret
            lo, hi = span(st.kv_to, r)  # the part of our keys that went there
            recvs += [(("k", lo, _first(ret[0], hi - lo)), st.kv_to),
                      (("v", lo, _first(ret[1], hi - lo)), st.kv_to)]
        if st.q_to is not None:
            q_ret = q_ret or [torch.empty_like(public(dq))]
            recvs.append((("q", 0, q_ret[0]), st.q_to))
        returns = (comm.post(sends, [(x[2], p) for x, p in recvs]), [x for x, _ in recvs],
                   sends)
        pending = nxt
    _finish_returns(returns, consume)
    return dq, dk, dv


METHOD = Method("lightseq", Options, lightseq_forward, lightseq_backward, remat=True)
