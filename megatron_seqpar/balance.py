"""The ``balanced`` layout of a packed stream: which pieces of which documents each rank holds.

``assign(cu_seqlens, P)`` is deterministic (the same on every rank, from ``cu_seqlens`` and
``P`` alone, no communication) and gives every rank exactly ``S/P`` tokens:

1. a document whose causal work ``L(L+1)/2`` is a large share of the stream's is split over
   all ranks in zigzag pieces (rank ``r`` holds pieces ``r`` and ``2P-1-r``, as the zigzag
   layout cuts one sequence), so its work is even; rank ``r``'s pair of pieces holds
   ``L // P`` or ``L // P + 1`` tokens, the extra ones going to the ranks with the most room,
   which keeps every rank within ``S/P`` (no padding: lengths need not be multiples of 2P);
2. the other documents stay whole: largest work first, each onto the rank with the least work
   that still has room for it (LPT);
3. what fits nowhere whole is cut contiguously over the ranks that have room, in rank order
   (a few documents at most: the room left is fragmented only by the whole ones).

Which documents are split (step 1) is searched: the ``k`` documents of most work, for the
``k`` whose assignment has the smallest largest-rank work (ties: the fewest split), so short
documents never cost communication unless the balance needs it. The cost of a rank is the
causal attention pairs of its queries (``pairs``); the per-token linear work is the same on
every rank, since every rank holds ``S/P`` tokens.

A rank's pieces are ordered split documents first (in document order), then its whole
documents: what other ranks read of a shard (the earlier pieces of the split documents) then
sits in one contiguous range at its front, so the methods that move only the range a receiver
reads (``kernels.kv_range``: LightSeq, LSS) never send a whole document.

``layouts.balance_report(cu_seqlens, P, layout)`` says what a layout achieves: per-rank pairs
and tokens, the largest over the mean, and how many documents are split over ranks.
"""

from __future__ import annotations

# pieces: (doc, start, end) in global stream positions, end exclusive


def pairs(doc_start: int, start: int, end: int) -> int:
    """Causal pairs of the queries at ``[start, end)`` of a document starting at
    ``doc_start`` (query ``i`` sees ``i - doc_start + 1`` keys)."""
    a, b = start - doc_start + 1, end - doc_start
    return (a + b) * (b - a + 1) // 2 if end > start else 0


def _zigzag_pieces(doc: int, a: int, b: int, room: list[int]):
    """Document ``[a, b)`` over all ranks in zigzag pieces; rank ``r``'s pair holds
    ``L // P (+1)``, the +1s going to the ranks with the most room (then the lowest rank).
    Returns per rank its pieces; ``room`` is updated."""
    P, L = len(room), b - a
    extra = sorted(range(P), key=lambda r: (-room[r], r))[:L % P]
    pair = [L // P + (r in extra) for r in range(P)]
    sizes = [0] * (2 * P)
    for r in range(P):
        sizes[r], sizes[2 * P - 1 - r] = pair[r] // 2, pair[r] - pair[r] // 2
    out, pos = [[] for _ in range(P)], a
    for k, n in enumerate(sizes):
        r = k if k < P else 2 * P - 1 - k
        if n:
            out[r].append((doc, pos, pos + n))
        pos += n
    for r in range(P):
        room[r] -= pair[r]
    return out


def _assign_with(docs, cu, P: int, s: int, split: set[int]):
    """The assignment when the documents in ``split`` are zigzagged over all ranks."""
    room, held, work = [s] * P, [[] for _ in range(P)], [0] * P
    for d in sorted(split):
        for r, pieces in enumerate(_zigzag_pieces(d, cu[d], cu[d + 1], room)):
            held[r] += pieces
            work[r] += sum(pairs(cu[d], x, y) for _, x, y in pieces)
    overflow = []
    for d in sorted((d for d in docs if d not in split),
                    key=lambda d: (-pairs(cu[d], cu[d], cu[d + 1]), d)):
        L = cu[d + 1] - cu[d]
        fits = [r for r in range(P) if room[r] >= L]
        if not fits:
            overflow.append(d)
            continue
        r = min(fits, key=lambda r: (work[r], r))
        held[r].append((d, cu[d], cu[d + 1]))
        room[r] -= L
        work[r] += pairs(cu[d], cu[d], cu[d + 1])
    for d in sorted(overflow):
        pos = cu[d]
        for r in range(P):
            n = min(room[r], cu[d + 1] - pos)
            if n > 0:
                held[r].append((d, pos, pos + n))
                work[r] += pairs(cu[d], pos, pos + n)
                room[r] -= n
                pos += n
    return held, work


def assign(cu_seqlens: tuple[int, ...], P: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per rank, its ``(doc, start, end)`` pieces (``S/P`` tokens each): the pieces of the
    documents split over ranks first, then its whole documents, each group in document
    order."""
    cu = tuple(cu_seqlens)
    S = cu[-1]
    if S % P:
        raise ValueError(f"the stream's {S} tokens are not divisible by P={P}")
    docs = [d for d in range(len(cu) - 1) if cu[d + 1] > cu[d]]
    if P == 1:
        return (tuple((d, cu[d], cu[d + 1]) for d in docs),)
    by_work = sorted(docs, key=lambda d: (-pairs(cu[d], cu[d], cu[d + 1]), d))
    best = None
    for k in range(len(by_work) + 1):
        held, work = _assign_with(docs, cu, P, S // P, set(by_work[:k]))
        if best is None or max(work) < best[0]:
            best = (max(work), held)
        if max(work) * P <= sum(work) * 1.01:  # within 1% of even: nothing left to gain
            break
    owners: dict[int, set[int]] = {}
    for r, held in enumerate(best[1]):
        for d, _, _ in held:
            owners.setdefault(d, set()).add(r)
    return tuple(tuple(sorted(h, key=lambda p: (len(owners[p[0]]) == 1, p))) for h in best[1])
