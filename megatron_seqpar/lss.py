"""LSS (Long-Short Sequence Transformer, Wang et al. 2023): the attention op.

Each rank owns one segment of the sequence (its queries). Forward: ONE fused all-gather of a
packed ``[K; V]`` buffer gives every rank the whole sequence's keys and values; the local
queries attend every segment (causal mask by global position, key padding), merged by
log-sum-exp. Backward: the same blocks in reverse give dQ locally and this rank's share of
every segment's dK/dV, written straight into a packed ``[P, dK; dV]`` buffer that ONE fused
reduce-scatter returns to the segments' owners. Exact.

Sparse visibility (a sliding window, packed sequences): when the ranks' queries read less than
the whole of the other shards, the all-gather becomes point-to-point transfers of just the keys
and values a receiver's blocks read (``kernels.kv_range``: one contiguous range per rank pair,
``_plan``), and the reduce-scatter becomes those ranges' dK/dV partials sent back to their
owners: a window narrower than a shard then sends the neighbour's last ``left`` keys, a stream
of documents that never cross a rank boundary sends nothing, and in the balanced layout only
the keys of the documents split over ranks travel.

``regather_kv`` (default True): the backward all-gathers K/V again instead of keeping the
forward's gathered copy, so between forward and backward a rank holds only its own segment
(``2·s·b·hkv·D``) rather than the whole sequence's (``2·S·b·hkv·D``), for one more all-gather
per call. With ``regather_kv=False`` the gathered K/V are saved for the backward (one
all-gather per call, ``2·S`` held per layer until its backward).

The other half of LSS, *double gradient averaging* of the parameters (sequence group, then
data-parallel group), lives in the Megatron integration (``megatron_seqpar.megatron``), not in
this op; its ``assemble_position_grads`` option sits in ``Options`` so one flag set covers both.

Per rank and call: forward sends ``(P-1)·2·s·b·hkv·D`` elements (all-gather); backward the
same again when ``regather_kv``, plus ``(P-1)/P·2·S·b·hkv·D`` in the accumulation dtype
(reduce-scatter). Live memory during one call: the gathered K/V (``2·S``, input dtype), whose
buffer the backward reuses, segment by segment, as the packed dK/dV send buffer when it is
regathered in the accumulation dtype (fp32, fp64); otherwise a ``2·S`` dK/dV buffer beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_seqpar.common import public
from megatron_seqpar.kernels import (
    acc_dtype,
    attend,
    attend_backward,
    cut_key_pad,
    key_ranges,
    rank_ranges,
    zeros_public,
)
from megatron_seqpar.layouts import slice_runs
from megatron_seqpar.method import BaseOptions, Method


@dataclass(frozen=True)
class Options(BaseOptions):
    """``regather_kv``: all-gather K/V again in the backward instead of keeping the gathered
    copy from the forward (holds ``2·s`` instead of ``2·S`` per layer between the passes).

    ``assemble_position_grads`` (used by the double gradient averaging, not by this op):
    level 1 all-reduces learned position-embedding gradients over the CP group like every
    other gradient, so each CP rank holds the full single-process gradient of every row and
    the tables stay identical across CP ranks; an unmodified optimizer's clipping and
    checkpoints (Megatron-LM's) are then exact. Default True because exactness of the default
    mode is never traded away (docs/design.md §5). False: the paper's rows *owned per segment*
    (E fewer elements sent per step), exact with our driver, but on Megatron-LM's route only with
    ``--clip-grad 0`` and without resuming its checkpoints
    (``megatron_seqpar.megatron.lss_grad``)."""

    regather_kv: bool = True
    assemble_position_grads: bool = True


def _plan(setup, s: int):
    """None when the dense collectives apply (no window or packing, or ranges that add up to
    the whole shards: ``kernels.key_ranges``), else ``(sources, sinks)``: ``[(j, lo, hi)]``,
    the key range of rank ``j``'s shard this rank's queries read, and ``[(i, lo, hi)]``, the
    range of this rank's keys that rank ``i``'s queries read (empty ranges left out). The same
    answer on every rank, from positions alone; ``cost.lss_ranges`` follows it."""
    span = setup.pair_ranges(key_ranges, s)
    return None if span is None else rank_ranges(span, setup.rank)


def _gather_kv(setup, k, v):
    """``[P, b·s·hkv·(D + Dv)]``: K and V of every rank in the public layout, packed (V's head
    dim may differ: MLA), by ONE all-gather, in place (this rank's K/V packed straight into
    their slot)."""
    comm = setup.comm()
    kv = k.new_empty(comm.world_size, k.numel() + v.numel())
    for dst, x in zip(_segment(kv[comm.rank], k.shape, v.shape), (k, v)):
        dst.copy_(x)
    return comm.all_gather_inplace(kv)


def _gather_ranges(setup, k, v, plan):
    """``[(j, lo, hi, K_j, V_j)]``: each source's key range as ``[b, hkv, n, ·]`` views,
    received point to point, while this rank's ranges go to its sinks."""
    sources, sinks = plan
    kp, vp = public(k), public(v)
    sends = [(x[:, lo:hi], i) for i, lo, hi in sinks for x in (kp, vp)]
    got, recvs = [], []
    for j, lo, hi in sources:
        kb = kp.new_empty(kp.size(0), hi - lo, *kp.shape[2:])
        vb = vp.new_empty(vp.size(0), hi - lo, *vp.shape[2:])
        recvs += [(kb, j), (vb, j)]
        got.append((j, lo, hi, kb.transpose(1, 2), vb.transpose(1, 2)))
    setup.comm().post(sends, recvs).wait()
    return got


def _segment(row, k_shape, v_shape):
    """A packed row's K and V as ``[b, hkv, s, ·]`` views (of ``[b, s, hkv, ·]`` storage)."""
    n = k_shape.numel()
    b, h, s = k_shape[:3]
    return (row[:n].view(b, s, h, k_shape[3]).transpose(1, 2),
            row[n:].view(b, s, h, v_shape[3]).transpose(1, 2))


def lss_forward(setup, q, k, v, kpm_all):
    s, r = q.size(2), setup.rank
    kw = dict(scale=setup.scale, **setup.mask, backend=setup.options.backend)
    plan = _plan(setup, s)
    if setup.traffic:
        setup.traffic.add_block_steps(sum(setup.sees(r, j, s)
                                          for j in range(setup.world_size)))
    if plan is not None:
        got = _gather_ranges(setup, k, v, plan)
        out, lse = attend(q, setup.runs(r, s), k, v, setup.runs(r, s),
                          kpm=setup.key_pad(kpm_all, r), **kw)
        for j, lo, hi, kj, vj in got:
            out, lse = attend(q, setup.runs(r, s), kj, vj, slice_runs(setup.runs(j, s), lo, hi),
                              kpm=cut_key_pad(setup.key_pad(kpm_all, j), lo, hi), out=out,
                              lse=lse, **kw)
        keep = () if setup.options.regather_kv else tuple(x for g in got for x in g[3:])
        return out, lse, keep
    kv = _gather_kv(setup, k, v)
    out = lse = None
    for j in range(setup.world_size):
        out, lse = attend(q, setup.runs(r, s), *_segment(kv[j], k.shape, v.shape),
                          setup.runs(j, s), kpm=setup.key_pad(kpm_all, j), out=out, lse=lse,
                          **kw)
    return out, lse, () if setup.options.regather_kv else (kv,)


def _backward_ranges(setup, dout, q, k, v, out, lse, kpm_all, plan, saved):
    """Sparse backward: the own block's dQ/dK/dV, each source range's dQ here and its dK/dV
    partial sent to its owner; the partials of this rank's ranges received and added."""
    s, r = q.size(2), setup.rank
    kw = dict(scale=setup.scale, **setup.mask, backend=setup.options.backend)
    sources, sinks = plan
    if saved:
        got = [(j, lo, hi, saved[2 * n], saved[2 * n + 1])
               for n, (j, lo, hi) in enumerate(sources)]
    else:
        got = _gather_ranges(setup, k, v, plan)
    dq, dk, dv = attend_backward(dout, q, setup.runs(r, s), k, v, setup.runs(r, s), out, lse,
                                 kpm=setup.key_pad(kpm_all, r), **kw)
    sends = []
    for j, lo, hi, kj, vj in got:
        _, dkp, dvp = attend_backward(dout, q, setup.runs(r, s), kj, vj,
                                      slice_runs(setup.runs(j, s), lo, hi), out, lse,
                                      kpm=cut_key_pad(setup.key_pad(kpm_all, j), lo, hi),
                                      dq=dq, **kw)
        sends += [(public(dkp), j), (public(dvp), j)]
    del got
    parts, recvs = [], []
    for i, lo, hi in sinks:
        bk = dk.new_empty(dk.size(0), hi - lo, dk.size(1), dk.size(3))
        bv = dv.new_empty(dv.size(0), hi - lo, dv.size(1), dv.size(3))
        recvs += [(bk, i), (bv, i)]
        parts.append((lo, hi, bk, bv))
    setup.comm().post(sends, recvs).wait()
    for lo, hi, bk, bv in parts:
        dk[:, :, lo:hi] += bk.transpose(1, 2)
        dv[:, :, lo:hi] += bv.transpose(1, 2)
    return dq, dk, dv


def lss_backward(setup, dout, q, k, v, out, lse, kpm_all, *saved):
    s = k.size(2)
    plan = _plan(setup, s)
    if plan is not None:
        return _backward_ranges(setup, dout, q, k, v, out, lse, kpm_all, plan, saved)
    kv = saved[0] if saved else _gather_kv(setup, k, v)
    cd = acc_dtype(q.dtype)
    # The reduce-scatter's packed send buffer: a regathered K/V buffer of the accumulation
    # dtype is recycled (segment j's dK/dV overwrite its K/V once its blocks are done), so the
    # backward holds 2·S once instead of twice; otherwise a buffer of its own.
    recycle = not saved and kv.dtype == cd
    dkv = kv if recycle else torch.zeros(kv.shape, dtype=cd, device=q.device)
    dq = zeros_public(q, cd)
    for j in range(setup.world_size):
        kj, vj = _segment(kv[j], k.shape, v.shape)
        acc = {} if recycle else dict(zip(("dk", "dv"), _segment(dkv[j], k.shape, v.shape)))
        _, dk, dv = attend_backward(dout, q, setup.runs(setup.rank, q.size(2)), kj, vj,
                                    setup.runs(j, s), out, lse, scale=setup.scale,
                                    **setup.mask,
                                    kpm=setup.key_pad(kpm_all, j),
                                    backend=setup.options.backend, dq=dq, **acc)
        if recycle:
            kj.copy_(dk)
            vj.copy_(dv)
        del dk, dv
    del kv  # a regathered copy (if not recycled) goes before the reduce-scatter's output
    dkv = setup.comm().reduce_scatter(dkv)  # [b·s·hkv·(D + Dv)]
    return (dq, *_segment(dkv, k.shape, v.shape))


METHOD = Method("lss", Options, lss_forward, lss_backward)
