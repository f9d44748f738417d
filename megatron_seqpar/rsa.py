"""RSA, Ring Self-Attention (Li et al., ACL 2023): two rings, K then V.

Forward: K chunks travel the ring ``r -> r+1`` ``P-1`` times; each rank fills its score rows
``[s, S]`` (columns in rank order) block by block, masks them by global position, packed
sequence and key padding, takes an exact softmax locally (row max, ``exp`` in place, row sums),
then V chunks travel the same ring to accumulate ``softmax · V``.
Backward: the V ring gives ``dP_j = dO·V_jᵀ`` and the partial ``dV_j = P_jᵀ·dO``; the softmax
backward ``dS = P∘(dP - δ)`` uses ``δ = rowsum(dO∘O)`` (equal to ``rowsum(dP∘P)``) and
overwrites the probabilities block by block; the K ring gives ``dQ += dS_j·K_j`` and the
partial ``dK_j = dS_jᵀ·Q``. Partials go straight back to their owner ``j`` (one send each),
overlapped with the next block.

Blocked math (what the method allows): only the blocks of the rows that some query needs are
computed (``kernels.plan_blocks``: causal blocks above the diagonal and other packed sequences
are skipped, diagonal blocks are cut in row tiles), always in place in the rows buffer. In the
K ring each block is filled by tiles (on CPU one K/V head, 1 MiB of rows: they stay in cache;
on CUDA the whole block, every head, in one batched call) and each tile is reduced at once: its
row max ``m``, ``exp(score - m)`` in place, its row sums. The rows thus hold ``exp(score - m)``
per block; the rescaling ``exp(m - M) / sum`` (``M`` the row max over all blocks) is one factor
per block row, applied to the ``[rows, D]`` products and operands (the context, dO, Q and dQ)
instead of passes over the ``s x S`` rows. The K ring works in base 2 (``exp2``, as flash
kernels do). The backward's ``dO·V_jᵀ`` is computed by the same tiles (on CUDA by row slices of
all heads, at most ``CUDA_TILE_ELEMS`` each: a bounded temporary), and its products with the
rows are taken as ``dOᵀ·P`` and ``Qᵀ·dS`` (the dV and dK partials travel transposed): the rows
are then read in their own order, about 13% faster than through a transposed operand here.

Memory per rank: the score/probability rows ``b·hq·s·S`` in the accumulation dtype, kept for
the backward, of which only the needed blocks are stored (``plan_rows``: each contiguous, in
ring order; about half the rows for a causal mask, the band for a sliding window). That
quadratic term is the method, kept faithfully; the other methods exist to avoid it. On CPU
``keep_rows`` (default on) keeps the row buffers across calls (``hostmem.BufferPool``: a
buffer is reused only once the graph that saved it let go of it, never while a live graph
holds it; the last step's buffers, one per layer, stay resident between steps), so they are
faulted in once instead of every call; ``huge_pages`` (default on) asks Linux for
transparent huge pages for a new buffer (``hostmem``: 512x fewer first-touch faults). On CUDA
the caching allocator does what the pool does. Sent per rank, forward: ``(P-1)·s·b·hkv·D`` for
each of K and V; backward: the same again plus ``(P-1)·s·b·hkv·D`` partials of dK and of dV
(accumulation dtype).

Sparse visibility (a sliding window, packed sequences): the rings stop after the farthest
chunk some rank's queries see (``_ring_steps``), and a chunk travels only the range of its
tokens that the other ranks read (``ring_ranges``: the hull of their ``kernels.key_ranges``),
its dK/dV partials likewise: a window narrower than a shard moves the neighbour's last
``left`` keys, and in the balanced layout only the keys of the documents split over ranks
travel.

``colossalai_compat=True`` reproduces ColossalAI's original gradients, which all-reduce
full-length dK/dV and divide dQ, dK, dV by ``P`` (not the exact gradient; off by default).
The block-kernel ``backend`` option does not apply: RSA materialises its score rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_seqpar.hostmem import BufferPool, advise_huge_pages
from megatron_seqpar.kernels import (
    acc_dtype,
    block_mask,
    device_kind,
    key_ranges,
    plan_blocks,
    rank_ranges,
    ring_steps,
)
from megatron_seqpar.method import BaseOptions, Method

# the K ring works in base 2 (scores times log2(e), then exp2: about 3x cheaper than exp on
# CPU, the same trick as flash kernels); the log-sum-exp it returns is natural
_LOG2E, _LN2 = math.log2(math.e), math.log(2.0)


@dataclass(frozen=True)
class Options(BaseOptions):
    """``colossalai_compat``: scale gradients by 1/P like ColossalAI's original RSA.
    ``huge_pages``: on CPU (Linux), back the score rows with transparent huge pages
    (``megatron_seqpar.hostmem``; no effect on values). ``keep_rows``: on CPU, keep the row
    buffers across calls (``hostmem.BufferPool``; no effect on values). ``backend`` stays
    ``auto``: RSA materialises its score rows and runs no block kernel, so another value is
    refused."""

    colossalai_compat: bool = False
    huge_pages: bool = True
    keep_rows: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.backend != "auto":
            raise ValueError(f"rsa runs no block kernel (it materialises its score rows), so "
                             f"backend={self.backend!r} would be ignored; leave it 'auto' (drop "
                             "--seqpar-backend)")
        for name in ("colossalai_compat", "huge_pages", "keep_rows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rsa Options.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")


def _ring(comm, own: torch.Tensor, visit, total: torch.Tensor | None = None,
          steps: int | None = None, ranges=None):
    """Pass ``own`` (``[..., s, ·]``) around the ring; ``visit(j, chunk, lo)`` sees every rank
    ``j``'s chunk once (with ``steps < P``: only the chunks of the ``steps - 1`` ranks before
    it, the ring cut short where no rank needs a farther chunk: ``_ring_steps``).

    ``ranges[j] = (lo, hi)``: the tokens of rank ``j``'s chunk that travel (``ring_ranges``:
    what the other ranks read; default all): ``chunk`` holds tokens ``[lo, hi)`` of ``j``'s,
    this rank's own chunk is visited whole (``lo = 0``), and an empty range travels not at all.

    The next chunk's transfer is in flight while ``visit`` runs. With ``total`` (zeros,
    ``[..., s]``), ``visit(j, chunk, acc, lo)`` adds ``j``'s partial into ``acc`` (the columns
    of ``j``'s range) instead: this rank's own partial straight into ``total``, the others into
    a zeroed buffer that is posted to ``j`` with the matching receive of this rank's own
    partial (its range's columns) and added to ``total`` one step later (after the next
    step's transfers are posted). Two such buffers and two receive buffers alternate (a pair is
    reused once it is settled), so at most two partials per direction are alive and no step
    allocates. Returns ``total``.
    """
    P, r = comm.world_size, comm.rank
    steps = P if steps is None else steps
    s = own.size(-2)
    ranges = ((0, s),) * P if ranges is None else ranges
    width = max(hi - lo for lo, hi in ranges)

    def sized(buf, j, dim):  # the prefix of a flat buffer shaped for j's range along dim
        shape = list(buf.shape)
        shape[dim] = ranges[j][1] - ranges[j][0]
        return buf.view(-1)[:math.prod(shape)].view(shape)

    def slot(x, dim):  # a flat-backed buffer like x with the widest range along dim
        shape = list(x.shape)
        shape[dim] = width
        return x.new_empty(shape)

    lo_r, hi_r = ranges[r]
    send = own[..., lo_r:hi_r, :].contiguous()  # transfers need dense buffers
    cur, j = own, r
    bufs = [slot(own, -2), slot(own, -2)] if P > 1 else []
    n = min(2, steps - 1) if total is not None else 0
    sent = [slot(total, -1) for _ in range(n)]
    recv = [slot(total, -1) for _ in range(n)]
    last = None

    def settle(item):
        item[0].wait()
        total[..., lo_r:hi_r].add_(item[1])

    for t in range(steps):
        nxt = (j - 1) % P  # the chunk this step receives
        pending = (comm.post(_nonempty([(send, (r + 1) % P)]),
                             _nonempty([(sized(bufs[t % 2], nxt, -2), (r - 1) % P)]))
                   if t < steps - 1 else None)
        lo = 0 if j == r else ranges[j][0]
        if total is None:
            visit(j, cur, lo)
        elif j == r:
            visit(j, cur, total, lo)
        else:
            acc, into = sized(sent[t % n], j, -1).zero_(), sized(recv[t % n], r, -1)
            visit(j, cur, acc, lo)
            item = (comm.post(_nonempty([(acc, j)]), _nonempty([(into, (r + t) % P)])), into)
            if last is not None:
                settle(last)
            last = item
        if pending is not None:
            pending.wait()
            cur = send = sized(bufs[t % 2], nxt, -2)
            j = nxt
    if last is not None:
        settle(last)
    return total


def _nonempty(transfers):
    """The transfers of a ring step that move something (an empty range travels not at all,
    on either side)."""
    return [(t, p) for t, p in transfers if t.numel()]


def ring_ranges(span, P: int, local_len: int):
    """Per rank ``j``, the tokens ``[lo, hi)`` of its chunk that travel the rings: the hull of
    the key ranges the other ranks' queries read (``span``, a ``kernels.key_ranges`` matrix;
    ``(0, 0)`` when none does), or the whole chunk when ``span`` is None (the ranges add up
    to the whole shards, or no window or packing). Pure: the cost model calls it too."""
    if span is None:
        return ((0, local_len),) * P
    out = []
    for j in range(P):
        readers = rank_ranges(span, j)[1]  # the other ranks' non-empty ranges of j's keys
        out.append((min(lo for _, lo, _ in readers), max(hi for _, _, hi in readers))
                   if readers else (0, 0))
    return tuple(out)


def _ranges(setup, s):
    """This call's ``ring_ranges``."""
    return ring_ranges(setup.pair_ranges(key_ranges, s), setup.world_size, s)


def _ring_steps(setup, s) -> int:
    """Ring steps this call needs, the same on every rank: rank ``j``'s chunk reaches rank
    ``i`` at step ``(i - j) mod P``, so the ring stops after the farthest chunk some rank's
    queries see. A sliding window narrower than a shard needs 2 steps (one neighbour) in the
    contiguous layout; without a window or packed sequences, ``P``."""
    if setup.window is None and setup.cu_seqlens is None:
        return setup.world_size
    return ring_steps(setup.sees_matrix(s))


def _blocks(setup, s):
    """This rank's ``plan_rows``."""
    return plan_rows(setup.runs(setup.rank, s), [setup.runs(j, s) for j in range(setup.world_size)],
                     setup.causal, setup.window)


def plan_rows(q_runs, k_runs_per_rank, causal: bool, window=None):
    """Per source rank ``j``: the ``(rows, columns within j's chunk, kind)`` blocks of a rank's
    score rows that some query needs (``kernels.plan_blocks``); the rest of the rows are never
    computed nor stored (fully masked: later positions, other packed sequences, outside a
    window). A diagonal block is cut into row tiles of at least 256 rows (eight per block at
    most): a tile sees the keys before it in full and its own square causally, so about half of
    each diagonal is skipped too. Pure: the cost model calls it too (``cost._rsa``)."""
    out = []
    for k_runs in k_runs_per_rank:
        blocks = []
        for blk in plan_blocks(q_runs, k_runs, causal, window=window):
            n = blk.q.stop - blk.q.start
            if blk.kind != "causal" or n <= 256:
                blocks.append(blk)
                continue
            t = max(256, -(-n // 8))
            for a in range(0, n, t):
                rows = slice(blk.q.start + a, blk.q.start + min(n, a + t))
                k0 = blk.k.start + a
                if a:
                    blocks.append(blk._replace(q=rows, k=slice(blk.k.start, k0), kind="full"))
                blocks.append(blk._replace(q=rows, k=slice(k0, k0 + rows.stop - rows.start)))
        out.append(blocks)
    return out


def row_elements(plans) -> int:
    """Score-row entries per head and batch row that ``plans`` store: the needed blocks."""
    return sum((blk.q.stop - blk.q.start) * (blk.k.stop - blk.k.start)
               for blocks in plans for blk in blocks)


def _block_bool_mask(blk, kpm, device):
    """The block's masked entries as one bool ``[b|1, 1, sq|1, sk]`` (its causal triangle,
    offset triangle and key padding), or None."""
    causal, mask = block_mask(blk, kpm, device)
    if causal:
        n = blk.q.stop - blk.q.start
        tri = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1).view(1, 1, n, n)
        mask = tri if mask is None else mask | tri
    return mask


def _row_tiles(blk, cols: int, row_elems: int, budget: int):
    """Row slices of ``blk`` whose ``rows x cols`` temporaries hold at most ``budget``
    elements (at least one row each)."""
    step = max(1, budget // max(1, row_elems * cols))
    return [slice(a, min(blk.q.stop, a + step)) for a in range(blk.q.start, blk.q.stop, step)]


CUDA_TILE_ELEMS = 1 << 26  # CUDA backward: dO·V_jᵀ temporaries up to 256 MiB (fp32)


def _tiles(blk, b: int, g: int, hkv: int, cols: int, device_type: str = "cpu",
           whole: bool = False):
    """``(kv heads, rows)`` tiles of a block.

    CPU: one K/V head's query group by row slices whose ``b·g·rows·cols`` scores fit in a
    core's L2 cache (1 MiB fp32 here), at least 16 rows: the scores are written, reduced and
    exponentiated there before the next tile. CUDA: every head at once, one batched call per
    block (``whole``: the forward, which works in the rows themselves), or row slices of at
    most ``CUDA_TILE_ELEMS`` (the backward's ``dO·V_jᵀ`` temporary): the CPU's cache tiles would
    cost ~100K kernel launches per layer at S=32K, P=4 (``kernel_calls``)."""
    if device_type == "cuda":
        heads = slice(0, hkv)
        if whole:
            return [(heads, blk.q)]
        return [(heads, rows) for rows in _row_tiles(blk, cols, b * g * hkv, CUDA_TILE_ELEMS)]
    budget = max(1 << 18, 16 * b * g * cols)
    return [(slice(h, h + 1), rows) for h in range(hkv)
            for rows in _row_tiles(blk, cols, b * g, budget)]


def kernel_calls(setup, s: int, b: int, hq: int, hkv: int, device_type: str) -> dict:
    """Tiles (each a handful of kernel calls) of one RSA layer on this rank: ``forward``
    (score tiles of the K ring) and ``backward`` (``dO·V_jᵀ`` tiles of the V ring), plus the
    needed ``blocks`` (each one batched product per ring step on either device)."""
    plans, g = _blocks(setup, s), hq // hkv
    blocks = [blk for blocks in plans for blk in blocks]
    cols = [blk.k.stop - blk.k.start for blk in blocks]
    return dict(blocks=len(blocks),
                forward=sum(len(_tiles(blk, b, g, hkv, n, device_type, whole=True))
                            for blk, n in zip(blocks, cols)),
                backward=sum(len(_tiles(blk, b, g, hkv, n, device_type))
                             for blk, n in zip(blocks, cols)))


def _stat_slices(plans):
    """Each block's rows in the flat per-block statistics (row max, factor), and their
    total count."""
    out, n = [], 0
    for blocks in plans:
        out.append([])
        for blk in blocks:
            out[-1].append(slice(n, n + blk.q.stop - blk.q.start))
            n += blk.q.stop - blk.q.start
    return out, n


def _block_views(rows: torch.Tensor, plans, b: int, hkv: int, g: int):
    """Each needed block's ``[b, hkv, g, rows, cols]`` view of the flat score-row buffer: the
    blocks lie one after another in ring order, each contiguous (a tile of one head is one
    stretch of memory); the buffer's tail, the blocks nobody needs, is never touched."""
    out, off = [], 0
    for blocks in plans:
        out.append([])
        for blk in blocks:
            shape = (b, hkv, g, blk.q.stop - blk.q.start, blk.k.stop - blk.k.start)
            out[-1].append(rows[off:off + math.prod(shape)].view(shape))
            off += math.prod(shape)
    return out


def _shift(cols: slice, lo: int) -> slice:
    """A block's key columns in a chunk that holds the owner's tokens from ``lo`` on."""
    return slice(cols.start - lo, cols.stop - lo)


def _add_product_t(acc, a, x):
    """``acc[b, hkv, D, n] += Σ_g a[b, hkv, g, rows, D]ᵀ · x[b, hkv, g, rows, n]``, in place
    and without a temporary (``acc``: columns of a ``[b, hkv, D, s]`` partial; ``x``: a block
    of the rows, read in its own order)."""
    acc3 = acc.flatten(0, 1)
    for gi in range(a.size(2)):
        acc3.baddbmm_(a[:, :, gi].flatten(0, 1).transpose(1, 2), x[:, :, gi].flatten(0, 1))


def rsa_forward(setup, q, k, v, kpm_all):
    """K ring: the needed blocks of the score rows, tile by tile in cache: scores, the
    block's row max ``m``, ``exp(score - m)`` in place and its row sums. V ring: each block
    times ``V_j``, rescaled by ``exp(m - M)`` (``M`` the row max over all blocks) on the
    ``[s, D]`` product. The rows hold the per-block ``exp(score - m)``; the factors
    ``exp(m - M) / sum`` (one per block row) are kept for the backward."""
    comm, s, P = setup.comm(), q.size(2), setup.world_size
    b, hq, _, d = q.shape
    hkv = k.size(1)
    g = hq // hkv
    cd = acc_dtype(q.dtype)
    plans = _blocks(setup, s)
    stats, n_stat = _stat_slices(plans)
    dev = device_kind(q)
    qs = (q.to(cd) * (setup.scale * _LOG2E)).reshape(b, hkv, g, s, d)  # scores in base 2
    # the needed blocks of the s x S rows, one after another (causal: about half of them)
    n_rows = b * hkv * g * row_elements(plans)
    fresh = True
    if setup.options.keep_rows and q.device.type == "cpu":  # CUDA's allocator caches already
        probs, fresh = ROWS.take(n_rows, cd, q.device)
    else:
        probs = torch.empty(n_rows, dtype=cd, device=q.device)
    if fresh and setup.options.huge_pages:
        advise_huge_pages(probs)  # before the first write: fresh memory, faulted 2 MiB at a time
    views = _block_views(probs, plans, b, hkv, g)
    bmax = torch.empty(b, hkv, g, n_stat, 1, dtype=cd, device=q.device)  # per block row
    bsum = torch.empty_like(bmax)
    lowest = torch.finfo(cd).min

    def scores(j, k_j, lo):
        kt = k_j.to(cd).unsqueeze(2).transpose(-1, -2)
        kpm = setup.key_pad(kpm_all, j)
        for blk, sb, blk_rows in zip(plans[j], stats[j], views[j]):
            mask = _block_bool_mask(blk, kpm, q.device)
            cols = _shift(blk.k, lo)
            for hs, rows in _tiles(blk, b, g, hkv, blk.k.stop - blk.k.start, dev, whole=True):
                dst = blk_rows[:, hs, :, rows.start - blk.q.start:rows.stop - blk.q.start]
                torch.matmul(qs[:, hs, :, rows], kt[:, hs, ..., cols], out=dst)
                if mask is not None:
                    mt = mask if mask.size(2) == 1 else mask[:, :, rows.start - blk.q.start:
                                                             rows.stop - blk.q.start]
                    dst.masked_fill_(mt.unsqueeze(1), float("-inf"))
                st = slice(sb.start + rows.start - blk.q.start, sb.start + rows.stop - blk.q.start)
                m = bmax[:, hs, :, st]
                # a row without a key: -inf becomes the lowest finite value, so that
                # exp2(score - m) gives 0 and, later, exp2(m - M) is 0 (or 1 times a 0 sum)
                torch.amax(dst, -1, keepdim=True, out=m).clamp_(min=lowest)
                dst.sub_(m).exp2_()
                torch.sum(dst, -1, keepdim=True, out=bsum[:, hs, :, st])

    steps, ranges = _ring_steps(setup, s), _ranges(setup, s)
    _ring(comm, k, scores, steps=steps, ranges=ranges)
    rmax = torch.full((b, hkv, g, s, 1), lowest, dtype=cd, device=q.device)
    for j in range(P):
        for blk, st in zip(plans[j], stats[j]):
            m = rmax[..., blk.q, :]
            torch.maximum(m, bmax[..., st, :], out=m)
    fac = bmax  # becomes exp(m - M) per block row (0 for an empty block row), in place
    total = torch.zeros_like(rmax)
    for j in range(P):
        for blk, st in zip(plans[j], stats[j]):
            fac[..., st, :].sub_(rmax[..., blk.q, :]).exp2_()
            total[..., blk.q, :] += fac[..., st, :] * bsum[..., st, :]
    out = torch.zeros(b, hkv, g, s, v.size(-1), dtype=cd, device=q.device)
    scratch = torch.empty_like(out)  # a block's [rows, Dv] product, reused

    def context(j, v_j, lo):
        vj = v_j.to(cd).unsqueeze(2)
        for blk, st, p in zip(plans[j], stats[j], views[j]):
            prod = torch.matmul(p, vj[..., _shift(blk.k, lo), :],
                                out=scratch[..., :p.size(-2), :])
            out[..., blk.q, :].addcmul_(prod, fac[..., st, :])

    _ring(comm, v, context, steps=steps, ranges=ranges)
    inv = torch.where(total > 0, 1.0 / total, 0.0)
    out.mul_(inv)
    lse = torch.where(total > 0, total.log() + rmax * _LN2, float("-inf"))
    for j in range(P):  # the factors of the true probabilities: exp(m - M) / sum
        for blk, st in zip(plans[j], stats[j]):
            fac[..., st, :].mul_(inv[..., blk.q, :])
    if setup.traffic:
        setup.traffic.add_block_steps(sum(1 for blocks in plans if blocks))
    lse = lse.view(b, hq, s)
    return out.view(b, hq, s, -1), lse, (probs, fac, lse.clone())


def rsa_backward(setup, dout, q, k, v, out, lse, kpm_all, probs, fac, own_lse):
    """V ring: ``dV_jᵀ = dOᵀ·P`` and ``dS = P∘(dO·V_jᵀ - δ)`` over the needed blocks, written
    over the probabilities (``dO·V_jᵀ`` by cache tiles); K ring: ``dQ`` and the ``dK_jᵀ``
    partials (the partials are summed transposed, then turned once). The rows hold ``P`` up
    to a factor per block row (``fac``), which goes on the ``[rows, D]`` operands and
    products instead of a pass over the rows. ``own_lse``: the forward's; the factors are
    rescaled by ``exp(own_lse - lse)``, which is 1 unless softmax sinks took probability mass
    (no host read: the same code runs on CUDA)."""
    comm, s = setup.comm(), q.size(2)
    b, hq, _, d = q.shape
    hkv = k.size(1)
    g = hq // hkv
    cd = probs.dtype
    plans = _blocks(setup, s)
    stats, _ = _stat_slices(plans)
    views = _block_views(probs, plans, b, hkv, g)
    # 1 without sinks; rows that saw no key have fac = 0 already (and w = nan -> 0)
    w = torch.exp(own_lse.to(cd) - lse.to(cd)).nan_to_num_(0.0).view(b, hkv, g, s, 1)
    fac = fac.clone()  # [b, hkv, g, block rows, 1]: small; the saved one stays as it was
    for j in range(setup.world_size):
        for blk, st in zip(plans[j], stats[j]):
            fac[..., st, :].mul_(w[..., blk.q, :])
    dv_dim = v.size(-1)
    do = dout.to(cd).reshape(b, hkv, g, s, dv_dim)
    delta = (do * out.to(cd).reshape_as(do)).sum(-1, keepdim=True)  # = rowsum(dP∘P)
    dev = device_kind(q)
    tile = max(((hs.stop - hs.start) * b * g * (r.stop - r.start) * (blk.k.stop - blk.k.start)
                for blocks in plans for blk in blocks
                for hs, r in _tiles(blk, b, g, hkv, blk.k.stop - blk.k.start, dev)), default=1)
    tmp = [torch.empty(tile, dtype=cd, device=q.device)]  # one tile of dO·V_jᵀ, reused
    scratch = do.new_empty(b, hkv, g, s, max(d, dv_dim))  # a block's [rows, ·] operand/product

    def grad_v(j, v_j, dvt_j, lo):  # dV_jᵀ partial; dS_j (up to its factor) overwrites P_j
        vt = v_j.to(cd).unsqueeze(2).transpose(-1, -2)
        for blk, st, p in zip(plans[j], stats[j], views[j]):
            cols = _shift(blk.k, lo)
            dos = torch.mul(do[..., blk.q, :], fac[..., st, :],
                            out=scratch[..., :p.size(-2), :dv_dim])
            _add_product_t(dvt_j[..., cols], dos, p)
            n = blk.k.stop - blk.k.start
            for hs, rows in _tiles(blk, b, g, hkv, n, dev):  # in cache, like the K ring's
                dp = tmp[0][:(hs.stop - hs.start) * b * g * (rows.stop - rows.start) * n].view(
                    b, hs.stop - hs.start, g, rows.stop - rows.start, n)
                torch.matmul(do[:, hs, :, rows], vt[:, hs, ..., cols], out=dp)
                p[:, hs, :, rows.start - blk.q.start:rows.stop - blk.q.start].mul_(
                    dp.sub_(delta[:, hs, :, rows]))

    # dV and dK partials are summed transposed
    steps, ranges = _ring_steps(setup, s), _ranges(setup, s)
    dv = _ring(comm, v, grad_v, torch.zeros(b, hkv, dv_dim, s, dtype=cd, device=q.device),
               steps=steps, ranges=ranges)
    dv = dv.transpose(-1, -2).contiguous()
    tmp.clear()
    qs = q.to(cd).reshape(b, hkv, g, s, d) * setup.scale
    dq = torch.zeros_like(qs)

    def grad_k(j, k_j, dkt_j, lo):
        kj = k_j.to(cd).unsqueeze(2)
        for blk, st, ds in zip(plans[j], stats[j], views[j]):
            c, cols = fac[..., st, :], _shift(blk.k, lo)
            prod = scratch[..., :ds.size(-2), :d]
            dq[..., blk.q, :].addcmul_(torch.matmul(ds, kj[..., cols, :], out=prod), c)
            _add_product_t(dkt_j[..., cols], torch.mul(qs[..., blk.q, :], c, out=prod), ds)

    dk = _ring(comm, k, grad_k, torch.zeros(b, hkv, d, s, dtype=cd, device=q.device),
               steps=steps, ranges=ranges)
    dk = dk.transpose(-1, -2).contiguous()
    dq = dq.mul_(setup.scale).view(b, hq, s, d)
    if setup.options.colossalai_compat:
        for grad in (dq, dk, dv):
            grad.div_(setup.world_size)
    return dq, dk, dv


ROWS = BufferPool()  # the score-row buffers of CPU calls, kept across calls (``keep_rows``)

METHOD = Method("rsa", Options, rsa_forward, rsa_backward)
