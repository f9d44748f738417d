"""Sequence layouts: which global token positions each rank holds.

``contiguous``: rank ``r`` holds tokens ``[r*s, (r+1)*s)``.
``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
``2P-1-r`` (Megatron's ``get_batch_on_this_cp_rank`` layout, which balances causal work).

Positions are described as *runs*: ``Run(local, start, length, doc)`` says that local tokens
``[local, local+length)`` hold global positions ``[start, start+length)`` of packed sequence
``doc``. Every mask in the package is derived from runs, so the causal mask always follows
global positions and attention never crosses a sequence boundary.

Packed sequences (``cu_seqlens``: the global packed stream's boundaries ``[0, L1, L1+L2, ...,
S]``, the same on every rank): ``contiguous`` still gives rank ``r`` stream tokens
``[r*s, (r+1)*s)`` (a sequence may straddle ranks; runs are cut at the boundaries);
``zigzag`` cuts EVERY sequence into ``2P`` chunks and gives rank ``r`` chunks ``r`` and
``2P-1-r`` of each sequence, in sequence order (Transformer Engine's
``thd_get_partitioned_indices``, which Megatron's ``get_thd_batch_on_this_cp_rank`` uses).
Without ``cu_seqlens`` the stream is one sequence (``doc`` 0).

``balanced`` (packed streams only): short documents stay whole on one rank, long ones are
split over all ranks in zigzag pieces, every rank holds exactly ``S/P`` tokens and the largest
rank's causal work is minimised (``megatron_seqpar.balance``; no padding beyond ``S/P``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_seqpar.balance import assign, pairs
from megatron_seqpar.hostread import host_ints

LAYOUTS = ("contiguous", "zigzag", "balanced")
SEQUENCE_LAYOUTS = ("contiguous", "zigzag")  # the layouts that need no cu_seqlens


class Run(NamedTuple):
    local: int  # first local index
    start: int  # first global position
    length: int
    doc: int = 0  # packed sequence the run lies in (index into cu_seqlens; 0 if not packed)

    @property
    def end(self) -> int:
        return self.start + self.length


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def check_cu_seqlens(cu_seqlens, total: int, layout: str, world_size: int):
    """``cu_seqlens`` as a tuple of ints after validation (None stays None).

    Accepts a 1-d integer tensor or sequence, or a ``[1, n+1]`` tensor (flattened). It must
    start at 0, end at the global length ``total``, never decrease, and with ``zigzag`` every
    sequence length must be a multiple of ``2P``. Reads the values on the host once per tensor
    (``hostread``: one device sync per step for a CUDA tensor, not one per layer).
    """
    if cu_seqlens is None:
        if layout == "balanced":
            raise ValueError("the balanced layout places packed documents: pass cu_seqlens (for "
                             "one sequence use zigzag or contiguous)")
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or \
                cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}; "
                             "pass e.g. torch.tensor([0, L1, L1+L2, ..., S], dtype=torch.int32)")
        if cu_seqlens.dim() != 1 and not (cu_seqlens.dim() == 2 and cu_seqlens.size(0) == 1):
            raise ValueError(f"cu_seqlens must be 1-d [n+1] (or [1, n+1]), got shape "
                             f"{tuple(cu_seqlens.shape)}")
        cu = host_ints(cu_seqlens)  # once per tensor: every layer of a step passes the same
    else:
        try:
            cu = tuple(cu_seqlens)
        except TypeError:
            raise ValueError("cu_seqlens must be a 1-d integer tensor or sequence") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu):
            raise ValueError("cu_seqlens must hold integers [0, L1, L1+L2, ..., S]")
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least [0, S], got {cu[:4]}...")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but the packed stream holds {total} "
                         f"tokens (P x local length); its last entry must be the global length, "
                         "pad the last sequence (or add a padding sequence) to fill it")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing (cumulative sequence lengths)")
    if layout == "zigzag" and world_size > 1:
        bad = [b - a for a, b in zip(cu, cu[1:]) if (b - a) % (2 * world_size)]
        if bad:
            raise ValueError(f"zigzag over {world_size} ranks needs every packed sequence length "
                             f"to be a multiple of 2*P = {2 * world_size}, got {bad[:4]}; pad "
                             "each sequence (Megatron's cu_seqlens_padded) or use contiguous")
    return cu


def local_runs(layout: str, rank: int, world_size: int, local_len: int,
               cu_seqlens: tuple[int, ...] | None = None) -> tuple[Run, ...]:
    """Runs of the tokens that ``rank`` holds, for a local length ``local_len``
    (``cu_seqlens``: a validated tuple from ``check_cu_seqlens``, or None)."""
    check_layout(layout)
    if cu_seqlens is not None:
        return _packed_runs(layout, rank, world_size, local_len, tuple(cu_seqlens))
    if layout == "balanced":
        raise ValueError("the balanced layout needs cu_seqlens (packed documents)")
    if layout == "contiguous" or world_size == 1:
        return (Run(0, rank * local_len, local_len),)
    if local_len % 2:
        raise ValueError(
            f"zigzag layout needs an even local length, got {local_len}: make the global "
            f"sequence length divisible by 2*P = {2 * world_size}"
        )
    c = local_len // 2
    return (Run(0, rank * c, c), Run(c, (2 * world_size - 1 - rank) * c, c))


@lru_cache(maxsize=256)
def _packed_runs(layout, rank, world_size, local_len, cu) -> tuple[Run, ...]:
    out: list[Run] = []
    if layout == "balanced":
        local = 0
        for doc, a, b in _balanced(cu, world_size)[rank]:
            out.append(Run(local, a, b - a, doc))
            local += b - a
        return tuple(out)
    if layout == "contiguous" or world_size == 1:
        lo, hi = rank * local_len, (rank + 1) * local_len
        for doc, (a, b) in enumerate(zip(cu, cu[1:])):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                out.append(Run(a - lo, a, b - a, doc))
        return tuple(out)
    local = 0
    for doc, (a, b) in enumerate(zip(cu, cu[1:])):
        c = (b - a) // (2 * world_size)
        if c == 0:
            continue
        for chunk in (rank, 2 * world_size - 1 - rank):
            out.append(Run(local, a + chunk * c, c, doc))
            local += c
    return tuple(out)


@lru_cache(maxsize=64)
def _balanced(cu: tuple[int, ...], world_size: int):
    return assign(cu, world_size)


def balance_report(cu_seqlens, P: int, layout: str = "balanced") -> dict:
    """What ``layout`` gives each rank of a packed stream: ``pairs`` (causal attention pairs
    of its queries), ``tokens``, ``max_over_mean`` of the pairs, and ``split``: documents held
    by more than one rank (zigzag needs every length a multiple of 2P)."""
    cu = check_cu_seqlens(cu_seqlens, cu_seqlens[-1], layout, P)
    s = cu[-1] // P
    per_rank = [local_runs(layout, r, P, s, cu) for r in range(P)]
    work = [sum(pairs(cu[run.doc], run.start, run.end) for run in runs) for runs in per_rank]
    owners: dict[int, set[int]] = {}
    for r, runs in enumerate(per_rank):
        for run in runs:
            owners.setdefault(run.doc, set()).add(r)
    mean = sum(work) / P
    return {"layout": layout, "pairs": work, "tokens": [sum(x.length for x in runs)
                                                        for runs in per_rank],
            "max_over_mean": max(work) / mean if mean else 1.0,
            "split": sum(len(o) > 1 for o in owners.values()), "docs": len(owners)}


def slice_runs(runs: tuple[Run, ...], lo: int, hi: int, offset: int = 0) -> tuple[Run, ...]:
    """Runs of local tokens ``[lo, hi)``, renumbered to start at local index ``offset``."""
    out = []
    for r in runs:
        a, b = max(lo, r.local), min(hi, r.local + r.length)
        if a < b:
            out.append(Run(offset + a - lo, r.start + a - r.local, b - a, r.doc))
    return tuple(out)


def shift_runs(runs: tuple[Run, ...], offset: int) -> tuple[Run, ...]:
    """The same runs placed ``offset`` local tokens later (for concatenated buffers)."""
    return tuple(r._replace(local=r.local + offset) for r in runs)


def positions(runs: tuple[Run, ...], device=None) -> torch.Tensor:
    """Global positions of the local tokens, as a LongTensor in local order."""
    if not runs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(r.start, r.end, device=device) for r in runs])


def documents(runs: tuple[Run, ...], device=None) -> torch.Tensor:
    """Packed-sequence index of the local tokens, as a LongTensor in local order."""
    if not runs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.full((r.length,), r.doc, dtype=torch.long, device=device)
                      for r in runs])


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _chunk_order(layout: str, world_size: int) -> list[int]:
    """Global chunk index of each rank's local chunks, in rank order."""
    if layout == "contiguous":
        return list(range(world_size))
    return [c for r in range(world_size) for c in (r, 2 * world_size - 1 - r)]


def shard_sequence(x: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous",
                   cu_seqlens=None):
    """This rank's shard of a full-sequence tensor ``x`` along ``dim`` (no communication).

    ``cu_seqlens``: packed-sequence boundaries of ``x``'s stream (see the module docstring).
    """
    check_layout(layout)
    rank, world = _group_info(group)
    n = 2 * world if layout == "zigzag" else world
    if x.size(dim) % n:
        raise ValueError(
            f"sequence length {x.size(dim)} is not divisible by {n} ({layout} layout over "
            f"{world} ranks); pad or choose a length that is a multiple of {n}"
        )
    cu = check_cu_seqlens(cu_seqlens, x.size(dim), layout, world)
    if cu is not None and layout != "contiguous" and (world > 1 or layout == "balanced"):
        idx = positions(local_runs(layout, rank, world, x.size(dim) // world, cu), x.device)
        return x.index_select(dim, idx)
    chunks = x.chunk(n, dim=dim)
    if layout == "contiguous":
        return chunks[rank].contiguous()
    return torch.cat([chunks[rank], chunks[n - 1 - rank]], dim=dim)


def gather_sequence(x_local: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous",
                    cu_seqlens=None):
    """The full sequence from every rank's shard (one all-gather; not differentiable), in
    stream order (``cu_seqlens`` as in ``shard_sequence``)."""
    check_layout(layout)
    rank, world = _group_info(group)
    if world == 1:
        check_cu_seqlens(cu_seqlens, x_local.size(dim), layout, world)
        return x_local
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    s = x_local.size(dim)
    cu = check_cu_seqlens(cu_seqlens, s * world, layout, world)
    if cu is not None and layout != "contiguous":
        idx = torch.cat([positions(local_runs(layout, j, world, s, cu), x_local.device)
                         for j in range(world)])
        full = torch.empty_like(torch.cat(parts, dim=dim))
        return full.index_copy_(dim, idx, torch.cat(parts, dim=dim))
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    order = _chunk_order(layout, world)
    pieces = [p for part in parts for p in part.chunk(2, dim=dim)]
    ordered = [None] * (2 * world)
    for piece, chunk_id in zip(pieces, order):
        ordered[chunk_id] = piece
    return torch.cat(ordered, dim=dim)
