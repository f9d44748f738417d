"""Sequence layouts: which global token positions each rank holds.

``contiguous``: rank ``r`` holds tokens ``[r*s, (r+1)*s)``.
``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
``2P-1-r`` (Megatron's ``get_batch_on_this_cp_rank`` layout, which balances causal work).

Positions are described as *runs*: ``Run(local, start, length)`` says that local tokens
``[local, local+length)`` hold global positions ``[start, start+length)``. Every mask in the
package is derived from runs, so the causal mask always follows global positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


class Run(NamedTuple):
    local: int  # first local index
    start: int  # first global position
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def local_runs(layout: str, rank: int, world_size: int, local_len: int) -> tuple[Run, ...]:
    """Runs of the tokens that ``rank`` holds, for a local length ``local_len``."""
    check_layout(layout)
    if layout == "contiguous" or world_size == 1:
        return (Run(0, rank * local_len, local_len),)
    if local_len % 2:
        raise ValueError(
            f"zigzag layout needs an even local length, got {local_len}: make the global "
            f"sequence length divisible by 2*P = {2 * world_size}"
        )
    c = local_len // 2
    return (Run(0, rank * c, c), Run(c, (2 * world_size - 1 - rank) * c, c))


def slice_runs(runs: tuple[Run, ...], lo: int, hi: int, offset: int = 0) -> tuple[Run, ...]:
    """Runs of local tokens ``[lo, hi)``, renumbered to start at local index ``offset``."""
    out = []
    for r in runs:
        a, b = max(lo, r.local), min(hi, r.local + r.length)
        if a < b:
            out.append(Run(offset + a - lo, r.start + a - r.local, b - a))
    return tuple(out)


def shift_runs(runs: tuple[Run, ...], offset: int) -> tuple[Run, ...]:
    """The same runs placed ``offset`` local tokens later (for concatenated buffers)."""
    return tuple(Run(r.local + offset, r.start, r.length) for r in runs)


def positions(runs: tuple[Run, ...], device=None) -> torch.Tensor:
    """Global positions of the local tokens, as a LongTensor in local order."""
    return torch.cat([torch.arange(r.start, r.end, device=device) for r in runs])


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


def shard_sequence(x: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous"):
    """This rank's shard of a full-sequence tensor ``x`` along ``dim`` (no communication)."""
    check_layout(layout)
    rank, world = _group_info(group)
    n = 2 * world if layout == "zigzag" else world
    if x.size(dim) % n:
        raise ValueError(
            f"sequence length {x.size(dim)} is not divisible by {n} ({layout} layout over "
            f"{world} ranks); pad or choose a length that is a multiple of {n}"
        )
    chunks = x.chunk(n, dim=dim)
    if layout == "contiguous":
        return chunks[rank].contiguous()
    return torch.cat([chunks[rank], chunks[n - 1 - rank]], dim=dim)


def gather_sequence(x_local: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous"):
    """The full sequence from every rank's shard (one all-gather; not differentiable)."""
    check_layout(layout)
    rank, world = _group_info(group)
    if world == 1:
        return x_local
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    order = _chunk_order(layout, world)
    pieces = [p for part in parts for p in part.chunk(2, dim=dim)]
    ordered = [None] * (2 * world)
    for piece, chunk_id in zip(pieces, order):
        ordered[chunk_id] = piece
    return torch.cat(ordered, dim=dim)
