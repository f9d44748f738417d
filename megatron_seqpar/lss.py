"""LSS (Long-Short Sequence Transformer, Wang et al. 2023): the attention op.

Each rank owns one segment of the sequence (its queries). Forward: ONE fused all-gather of a
packed ``[K; V]`` buffer gives every rank the whole sequence's keys and values; the local
queries attend every segment (causal mask by global position, key padding), merged by
log-sum-exp. Backward: the same blocks in reverse give dQ locally and this rank's share of
every segment's dK/dV, written straight into a packed ``[P, dK; dV]`` buffer that ONE fused
reduce-scatter returns to the segments' owners. Exact.

Sparse visibility (a sliding window, packed sequences): when some rank's queries see none of
another rank's keys, the all-gather becomes point-to-point transfers of the packed ``[K; V]``
to exactly the ranks whose queries see them, and the reduce-scatter becomes the dK/dV partials
sent back to their owners (``Setup.peers``): a window narrower than a shard then talks to one
neighbour, and a stream of documents that never cross a rank boundary sends nothing.

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

from megatron_seqpar.kernels import acc_dtype, attend, attend_backward, zeros_public
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


def _gather_kv(setup, k, v, peers):
    """``[n, b·s·hkv·(D + Dv)]``: K and V of the ``n`` source ranks (every rank when dense) in
    the public layout, packed (V's head dim may differ: MLA). Dense: ONE all-gather, in place
    (this rank's K/V packed straight into their slot). Sparse: this rank's row sent to each
    rank that needs it, the sources' rows received, point to point."""
    comm = setup.comm()
    sources = range(comm.world_size) if peers is None else peers[0]
    kv = k.new_empty(len(sources), k.numel() + v.numel())
    mine = kv[list(sources).index(comm.rank)]
    for dst, x in zip(_segment(mine, k.shape, v.shape), (k, v)):
        dst.copy_(x)
    if peers is None:
        return comm.all_gather_inplace(kv)
    comm.post([(mine, i) for i in peers[1]],
              [(kv[n], j) for n, j in enumerate(sources) if j != comm.rank]).wait()
    return kv


def _return_partials(setup, dkv, peers):
    """This rank's dK/dV: dense, ONE reduce-scatter of the ``[P, ·]`` partials; sparse, each
    source's partial sent to it and the partials of the ranks that see this rank's keys
    received and added to its own."""
    comm = setup.comm()
    if peers is None:
        return comm.reduce_scatter(dkv)
    sources, sinks = peers
    own = dkv[sources.index(comm.rank)]
    got = [torch.empty_like(own) for _ in sinks]
    comm.post([(dkv[n], j) for n, j in enumerate(sources) if j != comm.rank],
              list(zip(got, sinks))).wait()
    for x in got:
        own += x
    return own


def _segment(row, k_shape, v_shape):
    """A packed row's K and V as ``[b, hkv, s, ·]`` views (of ``[b, s, hkv, ·]`` storage)."""
    n = k_shape.numel()
    b, h, s = k_shape[:3]
    return (row[:n].view(b, s, h, k_shape[3]).transpose(1, 2),
            row[n:].view(b, s, h, v_shape[3]).transpose(1, 2))


def lss_forward(setup, q, k, v, kpm_all):
    peers = setup.peers(q.size(2))
    kv = _gather_kv(setup, k, v, peers)
    sources = range(setup.world_size) if peers is None else peers[0]
    out = lse = None
    for n, j in enumerate(sources):
        out, lse = attend(q, setup.runs(setup.rank, q.size(2)), *_segment(kv[n], k.shape, v.shape),
                          setup.runs(j, k.size(2)), scale=setup.scale, **setup.mask,
                          kpm=setup.key_pad(kpm_all, j), backend=setup.options.backend,
                          out=out, lse=lse)
    if setup.traffic:
        setup.traffic.add_block_steps(sum(setup.sees(setup.rank, j, q.size(2))
                                          for j in range(setup.world_size)))
    return out, lse, () if setup.options.regather_kv else (kv,)


def lss_backward(setup, dout, q, k, v, out, lse, kpm_all, *saved):
    s = k.size(2)
    peers = setup.peers(s)
    sources = range(setup.world_size) if peers is None else peers[0]
    kv = saved[0] if saved else _gather_kv(setup, k, v, peers)
    cd = acc_dtype(q.dtype)
    # The reduce-scatter's packed send buffer: a regathered K/V buffer of the accumulation
    # dtype is recycled (segment j's dK/dV overwrite its K/V once its blocks are done), so the
    # backward holds 2·S once instead of twice; otherwise a buffer of its own.
    recycle = not saved and kv.dtype == cd
    dkv = kv if recycle else torch.zeros(kv.shape, dtype=cd, device=q.device)
    dq = zeros_public(q, cd)
    for n, j in enumerate(sources):
        kj, vj = _segment(kv[n], k.shape, v.shape)
        acc = {} if recycle else dict(zip(("dk", "dv"), _segment(dkv[n], k.shape, v.shape)))
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
    dkv = _return_partials(setup, dkv, peers)  # [b·s·hkv·(D + Dv)]
    return (dq, *_segment(dkv, k.shape, v.shape))


METHOD = Method("lss", Options, lss_forward, lss_backward)
