"""MQSP, Micro-Query Sequence Parallelism: gather queries, keep K/V local.

Each rank cuts its local queries into ``m`` micro-chunks of ``c = s/m`` tokens. Micro-step
``i`` (forward):

1. all-gather chunk ``i`` of every rank's Q: ``S/m`` queries, positions known from the layout;
2. attend them to the LOCAL K/V only (causal mask by global position, key padding): a
   ``[S/m, s]`` score block, the column block of the distributed softmax, as ``(o, lse)``;
3. distributed softmax in one exchange (docs/design.md §4): an all-gather of
   every rank's column-block ``lse`` of the ``S/m`` rows, merged locally by log-sum-exp into
   the global ``lse`` (one synchronisation instead of the max and sum all-reduces; bytes
   ``(P-1)·S/m·b·hq``: equal to theirs at P=4, less below, at most ``P/D`` of the Q gather
   above); the partial context ``o·exp(lse_local - lse)`` of each rank is
4. reduce-scattered back to the query owners, who get their exact output rows.

Micro-step ``i`` takes ``s/m`` rows of each rank: with the zigzag layout, piece ``i`` of the
early chunk and the mirrored piece ``m-1-i`` of the late one (``_pieces``), so every rank does
the same causal work in every micro-step and none waits at its collectives.
The score block is recycled across micro-steps, so live memory is one micro-step's block.
Backward, per micro-step: ONE all-gather of the packed ``[Q, dO, lse, δ]`` chunk, where
``δ = rowsum(dO∘O) = rowsum(dP∘P)`` is formed by each owner for its rows (no separate
all-reduce, no re-run of the forward, and O does not travel: ``mqsp_backward``), dK/dV
accumulate locally, and dQ partials are reduce-scattered to their owners.

Sparse visibility (a sliding window, packed sequences; ``_plan``): when the rows of a rank
that see another rank's keys add up to less than the shards (``kernels.query_ranges``: one
contiguous row range per rank pair), the gathers become point-to-point: each micro-step sends
a source only its chunk's rows inside that range, the source returns their partial
``(o, lse)`` and the owner merges them by log-sum-exp (``_sparse_forward``); the backward sends
those rows' ``[Q, dO, lse, δ]`` the same way and gets their dQ partials back
(``_sparse_backward``). A window narrower than a shard then sends a neighbour the ``left``
rows that reach it; documents inside a rank send nothing, and in the balanced layout only the
rows of the documents split over ranks travel.

Sent per rank and micro-step (elements, ``c = s/m``): forward ``(P-1)·c·b·hq·D`` (Q gather) +
``(P-1)/P·P·c·b·hq·D`` (context reduce-scatter, accumulation dtype) + ``(P-1)·P·c·b·hq``
statistics (lse all-gather); backward ``(P-1)·c·b·hq·(2D+2)`` (gather, accumulation dtype) +
``(P-1)/P·P·c·b·hq·D`` (dQ reduce-scatter). Memory: q, k, v, out, lse saved; one
micro-step's gathered queries, partial context and score block live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_seqpar.common import public, to_bhsd
from megatron_seqpar.kernels import (
    acc_dtype,
    attend,
    attend_backward,
    merge_,
    query_ranges,
    rank_ranges,
    zeros_public,
)
from megatron_seqpar.layouts import slice_runs
from megatron_seqpar.method import BaseOptions, Method


@dataclass(frozen=True)
class Options(BaseOptions):
    """``micro_q``: micro-chunks per rank (must divide the local length); ``None`` picks the
    smallest count ``>= max(P, 4)`` whose score block ``(S/m)·s·b·hq`` fits
    ``memory_budget_mb`` per rank (``pick_micro_chunks``)."""

    micro_q: int | None = None
    memory_budget_mb: float = 1024.0

    def __post_init__(self):
        super().__post_init__()
        if self.micro_q is not None and (not isinstance(self.micro_q, int) or self.micro_q < 1):
            raise ValueError(f"micro_q must be a positive integer or None, got {self.micro_q!r}")
        if not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")


MIN_MICRO_CHUNKS = 4


def micro_chunks(opts: Options, *, b: int, hq: int, s: int, world_size: int, itemsize: int):
    """Number of micro-chunks ``m`` (a divisor of ``s``): ``opts.micro_q``, or else
    ``pick_micro_chunks`` with the budget of ``opts``."""
    if opts.micro_q is not None:
        if s % opts.micro_q:
            raise ValueError(f"MQSP micro_q={opts.micro_q} does not divide the local length {s}; "
                             "choose a divisor of the local sequence length")
        return opts.micro_q
    return pick_micro_chunks(s=s, world_size=world_size, row_bytes=s * b * hq * itemsize,
                             budget_bytes=opts.memory_budget_mb * 2**20)


def pick_micro_chunks(*, s: int, world_size: int, row_bytes: int, budget_bytes: float) -> int:
    """The smallest divisor ``m`` of ``s`` with ``m >= max(P, MIN_MICRO_CHUNKS)`` whose score
    block fits the budget.

    ``m >= P`` keeps every gathered buffer (``S/m`` queries, their dO/O, the partial context and
    dQ) no larger than the local tensors, so MQSP's live memory stays linear in ``s``; the
    score block of one micro-step is ``(S/m)`` rows of ``row_bytes`` (``s·b·hq·itemsize``).
    The fused kernels never hold that block, so the default budget (1 GiB) leaves the
    micro-steps large: fewer, larger kernel calls (a backward call's cost grows with its key
    count whatever its rows). ``m >= 4`` keeps the gathered rows at half the local length at
    P=2 (m=P=2 held more than LSS). Measured (docs/benchmarks.md, S=16K, P=2): m=16 took 1.11x
    the time of m=4, whose peak is still the smallest of the methods.
    Plain Python: ``megatron_seqpar.cost`` models the same choice.
    """
    for m in range(min(max(world_size, MIN_MICRO_CHUNKS), s), s + 1):
        if s % m == 0 and (world_size * s // m) * row_bytes <= budget_bytes:
            return m
    return s


def _pieces(setup, j, s, m, i):
    """Local row ranges ``(start, length)`` of rank ``j``'s micro-step ``i`` (``s/m`` rows).

    Balanced cut: when every run of every rank divides by ``m``, each run gives one piece of
    ``length/m`` rows: piece ``i`` of a run in the first half of its sequence, piece
    ``m-1-i`` of a run in the second half. The zigzag layout holds mirrored chunks
    (``p -> S - p``), so a query at ``p`` and its mirror together see exactly the rank's key
    count whatever ``p`` is: every micro-step then costs every rank the same causal work, and
    no rank waits at the step's collectives. Otherwise rows ``[i·s/m, (i+1)·s/m)``.
    """
    P = setup.world_size
    runs = [setup.runs(x, s) for x in range(P)]
    if any(r.length % m for rr in runs for r in rr):
        return ((i * (s // m), s // m),)
    cu = setup.cu_seqlens
    out = []
    for r in runs[j]:
        mid2 = (cu[r.doc] + cu[r.doc + 1]) if cu is not None else s * P  # twice the middle
        e = r.length // m
        late = 2 * r.start + r.length > mid2
        out.append((r.local + (m - 1 - i if late else i) * e, e))
    return tuple(out)


def _piece_runs(setup, j, s, pieces):
    """Runs of rank ``j``'s micro-step rows (the pieces one after another), from 0."""
    runs, out, off = setup.runs(j, s), [], 0
    for a, n in pieces:
        out += slice_runs(runs, a, a + n, offset=off)
        off += n
    return tuple(out)


def _micro_steps(setup, q, kpm_all):
    """``(m, c, acc dtype, this rank's key padding)`` shared by the forward and backward."""
    b, hq, s, _ = q.shape
    cd = acc_dtype(q.dtype)
    m = micro_chunks(setup.options, b=b, hq=hq, s=s, world_size=setup.world_size,
                     itemsize=torch.finfo(cd).bits // 8)
    return m, s // m, cd, setup.key_pad(kpm_all, setup.rank)


def _take(x, pieces):
    """The rows of ``pieces`` of a public ``[b, s, h, d]`` tensor, one after another (a copy)."""
    return torch.cat([x[:, a:a + n] for a, n in pieces], dim=1)


def _put(dst, pieces, rows):
    """Write ``rows`` (``_take``'s layout) back into the ``pieces`` of ``dst`` (dim 1, or the
    last dim for ``[b, h, s]`` statistics when ``dim=-1``)."""
    for off, (a, n) in _offsets(pieces):
        dst[:, a:a + n] = rows[:, off:off + n]


def _plan(setup, s: int):
    """None when the dense collectives apply (no window or packing, or row ranges that add up
    to the whole shards: ``kernels.query_ranges``), else ``(sources, sinks)``: ``[(j, lo, hi)]``,
    the local rows of this rank that see rank ``j``'s keys, and ``[(i, lo, hi)]``, the rows of
    rank ``i`` that see this rank's keys (other ranks only, empty ranges left out). The same
    answer on every rank, from positions alone; ``cost.mqsp_ranges`` follows it."""
    span = setup.pair_ranges(query_ranges, s)
    return None if span is None else rank_ranges(span, setup.rank)


def _cut(pieces, lo: int, hi: int):
    """The rows of a micro-step's ``pieces`` inside ``[lo, hi)``: ``[(offset in the step
    buffer, start, length)]``."""
    out = []
    for off, (a, n) in _offsets(pieces):
        x, y = max(a, lo), min(a + n, hi)
        if x < y:
            out.append((off + x - a, x, y - x))
    return out


def _step_cuts(setup, plan, s, m, i):
    """Micro-step ``i``'s ``(pieces, out, into)``: this rank's pieces, the cut of them that
    goes to each source, and the cut of each sink's pieces that comes here (non-empty cuts
    only: a pair with no rows in this step exchanges nothing)."""
    r = setup.rank
    sources, sinks = plan
    pieces = _pieces(setup, r, s, m, i)
    out = {j: c for j, lo, hi in sources if (c := _cut(pieces, lo, hi))}
    into = {j: c for j, lo, hi in sinks if (c := _cut(_pieces(setup, j, s, m, i), lo, hi))}
    return pieces, out, into


def _rows(cut) -> int:
    return sum(n for _, _, n in cut)


def _cut_rows(step, cut):
    """The rows of a cut: ``step`` (the micro-step's ``[b, c, ·]`` rows) itself when the cut
    holds all of them (one buffer then serves every source), else a copy of those rows."""
    if _rows(cut) == step.size(1):
        return step
    return _take(step, [(off, n) for off, _, n in cut])


def _sparse_forward(setup, q, k, v, kpm_all, plan):
    """Micro-steps with point-to-point transfers (module docstring): the rows of this rank's
    chunk that see a source's keys go to that source, the sinks' rows are attended to the
    local K/V and their ``(o, lse)`` returned, the sources' partials merged into this rank's
    rows."""
    comm, r, s = setup.comm(), setup.rank, q.size(2)
    b, hq, _, d = q.shape
    m, c, cd, kpm = _micro_steps(setup, q, kpm_all)
    kw = dict(scale=setup.scale, **setup.mask, kpm=kpm, backend=setup.options.backend)
    out = zeros_public((b, hq, s, v.size(-1)), cd, q.device)
    lse = torch.empty(b, hq, s, dtype=cd, device=q.device)
    qp, outp, k_runs = public(q), out.transpose(1, 2), setup.runs(r, s)
    for i in range(m):
        pieces, out_cut, in_cut = _step_cuts(setup, plan, s, m, i)
        mine = _take(qp, pieces)
        got = {j: qp.new_empty(b, _rows(cut), hq, d) for j, cut in in_cut.items()}
        pending = comm.post([(_cut_rows(mine, cut), j) for j, cut in out_cut.items()],
                            [(got[j], j) for j in in_cut])
        o, lb = attend(to_bhsd(mine), _piece_runs(setup, r, s, pieces), k, v, k_runs, **kw)
        pending.wait()
        sends = []
        for j, cut in in_cut.items():
            oj, lj = attend(to_bhsd(got[j]), _piece_runs(setup, j, s, [(a, n) for _, a, n in cut]),
                            k, v, k_runs, **kw)
            sends += [(public(oj), j), (lj, j)]
        back = {j: (o.new_empty(b, _rows(cut), hq, o.size(-1)),
                    lb.new_empty(b, hq, _rows(cut))) for j, cut in out_cut.items()}
        comm.post(sends, [(x, j) for j in out_cut for x in back[j]]).wait()
        for j, cut in out_cut.items():
            oj, lj = back[j][0].transpose(1, 2), back[j][1]
            at = 0
            for off, _, n in cut:
                merge_(o[:, :, off:off + n], lb[:, :, off:off + n], oj[:, :, at:at + n],
                       lj[:, :, at:at + n])
                at += n
        _put(outp, pieces, o.transpose(1, 2))
        _put(lse.transpose(1, 2), pieces, lb.transpose(1, 2))
    if setup.traffic:
        setup.traffic.add_block_steps(len(plan[1]) + setup.sees(r, r, s))
    return out, lse, ()


def _sparse_backward(setup, dout, q, k, v, out, lse, kpm_all, plan):
    """Per micro-step: the ``[Q, dO, lse, δ]`` rows of this rank's chunk that see a source's
    keys to that source, the sinks' rows' dQ partials computed against the local K/V (dK/dV
    accumulate here) and returned, the sources' dQ partials added to this rank's rows."""
    comm, r, s = setup.comm(), setup.rank, q.size(2)
    b, hq, _, d = q.shape
    dvd = dout.size(-1)
    m, c, cd, kpm = _micro_steps(setup, q, kpm_all)
    kw = dict(scale=setup.scale, **setup.mask, kpm=kpm, backend=setup.options.backend)
    dq = zeros_public(q, cd)
    dk, dv = zeros_public(k, cd), zeros_public(v, cd)
    pub = [public(x).to(cd) for x in (q, dout)] + [lse.to(cd).transpose(1, 2).unsqueeze(-1),
                                                   (dout.to(cd) * out.to(cd)).sum(-1)
                                                   .transpose(1, 2).unsqueeze(-1)]
    widths = (d, dvd, 1, 1)
    k_runs = setup.runs(r, s)

    def grads(rows, runs, dq_rows):
        gq, gdo, glse, gdelta = rows.split([hq * w for w in widths], dim=-1)
        gq, gdo = (to_bhsd(x.unflatten(-1, (hq, w))) for x, w in ((gq, d), (gdo, dvd)))
        glse, gdelta = glse.transpose(1, 2), gdelta.transpose(1, 2)
        norm = gdo.square().sum(-1)  # O as α·dO (mqsp_backward): rowsum(dO∘α·dO) = δ
        gout = gdo * torch.where(norm > 0, gdelta / norm, 0.0).unsqueeze(-1)
        attend_backward(gdo.to(q.dtype), gq.to(q.dtype), runs, k, v, k_runs,
                        gout.to(q.dtype), glse, dq=to_bhsd(dq_rows), dk=dk, dv=dv, **kw)

    for i in range(m):
        pieces, out_cut, in_cut = _step_cuts(setup, plan, s, m, i)
        mine = torch.cat([_take(x, pieces).flatten(2) for x in pub], dim=-1)  # [b, c, ·]
        got = {j: mine.new_empty(b, _rows(cut), mine.size(-1)) for j, cut in in_cut.items()}
        pending = comm.post([(_cut_rows(mine, cut), j) for j, cut in out_cut.items()],
                            [(got[j], j) for j in in_cut])
        own = torch.zeros(b, c, hq, d, dtype=cd, device=q.device)
        grads(mine, _piece_runs(setup, r, s, pieces), own)
        pending.wait()
        sends = []
        for j, cut in in_cut.items():
            dqj = own.new_zeros(b, _rows(cut), hq, d)
            grads(got[j], _piece_runs(setup, j, s, [(a, n) for _, a, n in cut]), dqj)
            sends.append((dqj, j))
        back = {j: own.new_empty(b, _rows(cut), hq, d) for j, cut in out_cut.items()}
        comm.post(sends, [(back[j], j) for j in out_cut]).wait()
        for j, cut in out_cut.items():
            at = 0
            for off, _, n in cut:
                own[:, off:off + n] += back[j][:, at:at + n]
                at += n
        _put(dq.transpose(1, 2), pieces, own)
    return dq, dk, dv


def mqsp_forward(setup, q, k, v, kpm_all):
    """Per micro-step, this rank's pieces are written into its slot of the gather buffer,
    rank j's gathered queries attend the local K/V straight into slot j of the reduce-scatter
    buffer ``[P, b, c, h, D]`` (no rearranging copies). The next micro-step's query gather is
    in flight while a step computes (two gather buffers alive: ``2·P·c`` query rows)."""
    plan = _plan(setup, q.size(2))
    if plan is not None:
        return _sparse_forward(setup, q, k, v, kpm_all, plan)
    comm, r, s, P = setup.comm(), setup.rank, q.size(2), setup.world_size
    b, hq, _, d = q.shape
    m, c, cd, kpm = _micro_steps(setup, q, kpm_all)
    kw = dict(scale=setup.scale, **setup.mask, kpm=kpm, backend=setup.options.backend)
    out = zeros_public((b, hq, s, v.size(-1)), cd, q.device)
    lse = torch.empty(b, hq, s, dtype=cd, device=q.device)
    qp, outp = public(q), out.transpose(1, 2)
    k_runs = setup.runs(r, s)

    def gather_queries(i):  # micro-step i's pieces into this rank's slot; the gather posted
        mine = _pieces(setup, r, s, m, i)
        gq = torch.empty(P, b, c, hq, d, dtype=q.dtype, device=q.device)
        for off, (a, n) in _offsets(mine):
            gq[r, :, off:off + n].copy_(qp[:, a:a + n])
        return mine, gq, comm.all_gather_post(gq)

    nxt = gather_queries(0)
    for i in range(m):
        mine, gq, pending = nxt
        pending.wait()
        nxt = gather_queries(i + 1) if i + 1 < m else None  # in flight during this step
        o = torch.zeros(P, b, c, hq, v.size(-1), dtype=cd, device=q.device)
        # every rank's lse of its column block of the same P·c rows; this rank's is its slot
        stats = torch.empty(P, P, b, hq, c, dtype=cd, device=q.device)
        lo = stats[r].fill_(float("-inf"))
        for j in range(P):
            attend(to_bhsd(gq[j]), _piece_runs(setup, j, s, _pieces(setup, j, s, m, i)), k, v,
                   k_runs, out=to_bhsd(o[j]), lse=lo[j], **kw)
        del gq, pending
        # distributed softmax in one exchange: gather the column blocks' lse, merge locally
        # (global lse; -inf where no rank sees a key)
        glse = torch.logsumexp(comm.all_gather_inplace(stats), dim=0)
        o.mul_(torch.exp(lo - glse.masked_fill(torch.isinf(glse), 0.0)).transpose(2, 3)
               .unsqueeze(-1))
        mo = comm.reduce_scatter(o)
        for off, (a, n) in _offsets(mine):
            outp[:, a:a + n] = mo[:, off:off + n]
            lse[:, :, a:a + n] = glse[r, :, :, off:off + n]
    if setup.traffic:  # (rank i's queries, our keys) pairs with a visible block
        setup.traffic.add_block_steps(sum(setup.sees(i, r, q.size(2))
                                          for i in range(setup.world_size)))
    return out, lse, ()


def _offsets(pieces):
    """``(offset in the micro-step buffer, (start, length))`` of each piece."""
    off, out = 0, []
    for a, n in pieces:
        out.append((off, (a, n)))
        off += n
    return out


def mqsp_backward(setup, dout, q, k, v, out, lse, kpm_all):
    """Per micro-step, ONE all-gather of the packed ``[Q; dO]`` pieces and their ``lse`` and
    ``δ = rowsum(dO∘O)``, written straight into this rank's slot; rank j's rows are used as
    views of it, their dQ partials go straight into slot j of the reduce-scatter buffer,
    dK/dV accumulate locally.

    O itself does not travel: the kernels read it only through ``rowsum(dO∘O)``, so each rank
    forms ``δ`` for its own rows, and rank j's kernel call gets ``α·dO`` in O's place, with
    ``α = δ/|dO|²`` per row (``rowsum(dO∘α·dO) = δ``; a zero row of dO has ``δ = 0`` and
    ``α = 0``). That is ``D - 1`` fewer elements per gathered row and one query-sized buffer
    less per rank slot."""
    plan = _plan(setup, q.size(2))
    if plan is not None:
        return _sparse_backward(setup, dout, q, k, v, out, lse, kpm_all, plan)
    comm, r, s, P = setup.comm(), setup.rank, q.size(2), setup.world_size
    b, hq, _, d = q.shape
    m, c, cd, kpm = _micro_steps(setup, q, kpm_all)
    kw = dict(scale=setup.scale, **setup.mask, kpm=kpm, backend=setup.options.backend)
    dq = zeros_public(q, cd)
    dk, dv = zeros_public(k, cd), zeros_public(v, cd)
    dqp_pub = dq.transpose(1, 2)
    src = [public(x) for x in (q, dout)]
    delta = (dout.to(cd) * out.to(cd)).sum(-1)  # [b, hq, s]
    k_runs = setup.runs(r, s)
    dims = (d, dout.size(-1))  # Q's and dO's head dims (they differ under MLA)
    n_q, n = b * c * hq * d, b * c * hq * sum(dims)

    def rows(row):  # a gathered row's Q and dO pieces [b, c, hq, ·] and its [2, b, hq, c] stats
        return ([x.view(b, c, hq, e) for x, e in zip((row[:n_q], row[n_q:n]), dims)],
                row[n:].view(2, b, hq, c))

    for i in range(m):
        mine = _pieces(setup, r, s, m, i)
        g = torch.empty(P, n + 2 * b * hq * c, dtype=cd, device=q.device)
        slot, slot_st = rows(g[r])
        for off, (a, ln) in _offsets(mine):
            for t, x in enumerate(src):
                slot[t][:, off:off + ln].copy_(x[:, a:a + ln])
            for t, x in enumerate((lse, delta)):
                slot_st[t, :, :, off:off + ln].copy_(x[:, :, a:a + ln])
        comm.all_gather_inplace(g)  # [P, b·c·hq·(D + Dv) + 2·b·hq·c], one collective
        dqp = torch.zeros(P, b, c, hq, d, dtype=cd, device=q.device)
        for j in range(P):
            (gq, gdo), (glse, gdelta) = rows(g[j])
            gq, gdo = to_bhsd(gq), to_bhsd(gdo)
            norm = gdo.square().sum(-1)
            gout = gdo * torch.where(norm > 0, gdelta / norm, 0.0).unsqueeze(-1)
            del norm
            attend_backward(gdo.to(q.dtype), gq.to(q.dtype),
                            _piece_runs(setup, j, s, _pieces(setup, j, s, m, i)), k, v, k_runs,
                            gout.to(q.dtype), glse, dq=to_bhsd(dqp[j]), dk=dk, dv=dv, **kw)
            del gout
        del g, slot, slot_st, gq, gdo, glse, gdelta  # views keep the gathered buffer alive
        mdq = comm.reduce_scatter(dqp)
        for off, (a, ln) in _offsets(mine):
            dqp_pub[:, a:a + ln] = mdq[:, off:off + ln]
    return dq, dk, dv


METHOD = Method("mqsp", Options, mqsp_forward, mqsp_backward, remat=True)
