"""Two-level sequence parallelism: a head all-to-all inside groups of ``U`` consecutive ranks
of the CP group, and a sequence-parallel method across the ``R = P/U`` groups.

``options.head_parallel = U`` (every method's options carry it). The CP group of ``P`` ranks is
cut into *inner* groups of ``U`` consecutive ranks (``0..U-1``, ``U..2U-1``, ...; Megatron's
hierarchical CP groups are made the same way) and *outer* groups of the ``R`` ranks that hold
the same place in their inner group. Around the method (inside one autograd op):

1. forward: ONE all-to-all over the inner group of the packed ``[Q, K, V]`` heads:
   ``[b, s, h, D] -> [b, U*s, h/U, D]`` (rank ``u`` of the inner group gets head group ``u`` of
   every inner rank's tokens, concatenated in inner-rank order); the key padding mask is
   all-gathered over the inner group the same way;
2. the method runs over the outer group on the ``U*s`` tokens; outer rank ``j`` holds the
   tokens of CP ranks ``jU .. jU+U-1`` (their position runs, concatenated, so the causal mask
   and packed sequences follow global positions for every layout);
3. ONE all-to-all returns the output ``[b, U*s, hq/U, D] -> [b, s, hq, D]``.
The backward mirrors it: one all-to-all of dO, the method's backward, one all-to-all of the
packed ``[dQ, dK, dV]``.

GQA: K/V heads are split over the inner group too. When ``hkv`` is not a multiple of ``U``
every K/V head is repeated ``lcm(hkv, U)/hkv`` times (the fewest copies that give each inner
rank whole heads serving exactly its query heads); their gradients are summed back.

Sent per rank and call (elements; ``h' = lcm(hkv, U)`` when repeated, else ``hkv``): forward
``(U-1)/U·b·s·(hq + 2h')·D`` (Q, K, V) + ``(U-1)/U·b·s·hq·D`` (the output), in the input
dtype, plus ``(U-1)·b·s`` bytes of key padding mask when one is given; backward
``(U-1)/U·b·s·hq·D`` (dO, input dtype) + ``(U-1)/U·b·s·(hq + 2h')·D`` (dQ, dK, dV, accumulation
dtype); plus the outer method's bytes for ``U*s`` tokens and ``hq/U`` heads over ``R`` ranks.

Process groups: ``two_level_groups(group, U)`` builds the inner and outer groups once per
(group, U) with ``use_local_synchronization`` (only member ranks take part, so a CP group
inside a larger world needs nothing from the other ranks) and caches them per default group
(a cache, not configuration: a new world gets new groups). Callers that already have them
(Megatron's ``get_hierarchical_context_parallel_groups()``) pass them as ``TwoLevelGroups``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_seqpar.layouts import Run, local_runs, shift_runs


@dataclass(frozen=True)
class TwoLevelGroups:
    """``inner``: the ``U`` consecutive ranks of this rank (head all-to-all); ``outer``: the
    ``R`` ranks at this rank's place in their inner groups (the method's group)."""

    inner: Any
    outer: Any


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # world pg -> {ranks: pg}


def _timeout_of(group):
    """The parent group's timeout, so the subgroups wait as long as it does (None: torch's
    default)."""
    kinds = ("cuda", "cpu") if "nccl" in str(dist.get_backend(group)) else ("cpu", "cuda")
    for kind in kinds:
        try:
            return group._get_backend(torch.device(kind)).options._timeout
        except Exception:  # noqa: BLE001,S112 - private API; try the next device, then default
            continue
    return None


def _subgroup(parent, ranks: tuple[int, ...]):
    cache = _GROUPS.setdefault(dist.group.WORLD, {})
    if ranks not in cache:
        cache[ranks] = dist.new_group(list(ranks), timeout=_timeout_of(parent),
                                      use_local_synchronization=True)
    return cache[ranks]


def _check_ranks(world_size: int, U: int) -> None:
    if world_size % U:
        raise ValueError(f"head_parallel={U} does not divide the {world_size} ranks of the "
                         "sequence group; choose U dividing P (U x R = P)")


def check_split(world_size: int, head_parallel: int, hq: int) -> None:
    """ValueError naming the fix when ``U`` does not divide ``P`` or the query heads."""
    U = head_parallel
    _check_ranks(world_size, U)
    if hq % U:
        raise ValueError(f"head_parallel={U} does not divide the {hq} query heads (per TP "
                         "rank); choose U dividing the heads")


def two_level_groups(group, head_parallel: int) -> TwoLevelGroups:
    """The inner/outer groups of this rank for ``U = head_parallel`` (built once, cached)."""
    parent = group if group is not None else dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(parent))
    U = head_parallel
    _check_ranks(len(ranks), U)
    j, u = divmod(ranks.index(dist.get_rank()), U)
    inner, outer = ranks[j * U:(j + 1) * U], ranks[u::U]
    return TwoLevelGroups(parent if inner == ranks else _subgroup(parent, inner),
                          parent if outer == ranks else _subgroup(parent, outer))


def two_level_runs(layout: str, outer_rank: int, world_size: int, head_parallel: int,
                   local_len: int, cu_seqlens=None) -> tuple[Run, ...]:
    """Runs of outer rank ``j``'s ``local_len = U*s`` tokens: CP ranks ``jU..jU+U-1`` of the
    ``P = world_size`` layout, concatenated in inner-rank order."""
    U, s = head_parallel, local_len // head_parallel
    out: tuple[Run, ...] = ()
    for i in range(U):
        cp_rank = outer_rank * U + i
        out += shift_runs(local_runs(layout, cp_rank, world_size, s, cu_seqlens), i * s)
    return out


def kv_heads(hq: int, hkv: int, head_parallel: int) -> int:
    """K/V heads after repetition: ``hkv`` if ``U`` divides it, else ``lcm(hkv, U)``."""
    return hkv if hkv % head_parallel == 0 else math.lcm(hkv, head_parallel)


def scatter_heads(comm, xs):
    """ONE all-to-all: each ``[b, s, h_i, D_i]`` (public layout) -> ``[b, U*s, h_i/U, D_i]``,
    all tensors packed in one buffer (they must share dtype; head dims may differ: MLA).
    Returns the list."""
    U = comm.world_size
    b, s = xs[0].shape[:2]
    # [U, b, s, sum(h_i/U·D_i)]: head group u of every tensor, for inner rank u
    send = torch.cat([x.reshape(b, s, U, -1).permute(2, 0, 1, 3) for x in xs], dim=3)
    recv = comm.all_to_all(send)  # [U (source), b, s, sum(h_i/U·D_i)]
    recv = recv.permute(1, 0, 2, 3).reshape(b, U * s, recv.size(3))
    parts = recv.split([x.size(2) // U * x.size(3) for x in xs], dim=2)
    return [p.reshape(b, U * s, x.size(2) // U, x.size(3)) for p, x in zip(parts, xs)]


def gather_heads(comm, xs):
    """The inverse of ``scatter_heads``: each ``[b, U*s, h_i/U, D_i]`` -> ``[b, s, h_i, D_i]``."""
    U = comm.world_size
    b, n = xs[0].shape[:2]
    s = n // U
    send = torch.cat([x.reshape(b, U, s, -1).transpose(0, 1) for x in xs],
                     dim=3)  # [U (dest), b, s, sum(h_i/U·D_i)]
    recv = comm.all_to_all(send)  # [U (head group), b, s, sum(h_i/U·D_i)]
    recv = recv.permute(1, 2, 0, 3)  # [b, s, U, sum]
    parts = recv.split([x.size(2) * x.size(3) for x in xs], dim=3)
    return [p.reshape(b, s, U * x.size(2), x.size(3)) for p, x in zip(parts, xs)]
