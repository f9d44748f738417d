"""Host reads of device tensors, once per tensor instead of once per layer.

Inside a training step the same tensors pass through every layer: Megatron's
``attention_mask``, and ``PackedSeqParams``' ``cu_seqlens``. What the attention path must know
on the host about them (packed-sequence boundaries, whether a mask has padding structure, a
key-padding mask's padded ranges) is a pure function of their values, so ``once`` computes it
on the first layer's call and hands the same result to every later layer: on CUDA one device
synchronisation per tensor (per step), not one per layer.

``once(x, key, fn)`` memoises ``fn(x)`` per tensor object, ``key`` and tensor version (an in-place
change of ``x`` computes it anew). Entries are held weakly by the tensor: they go with it (no
module state outlives the step's tensors, and nothing else is kept). Every host read of the
attention path lives in this module or runs through ``once`` (``tests/test_comm_staging.py``
checks the sources).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MEMO: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> {key: (version, value)}


def once(x: torch.Tensor, key: Hashable, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn(x)``, computed once per (tensor object, ``key``, version of ``x``)."""
    slot = _MEMO.get(x)
    if slot is None:
        slot = _MEMO[x] = {}
    version = x._version
    hit = slot.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    value = fn(x)
    slot[key] = (version, value)
    return value


def _ints(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in x.reshape(-1).tolist())


def host_ints(x: torch.Tensor) -> tuple[int, ...]:
    """An integer tensor's values, flattened, as a tuple of ints, read once per tensor (pass
    the caller's tensor itself, not a fresh view of it, or every call reads anew)."""
    return once(x, "ints", _ints)


def _true_runs(x: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """``[(lo, hi)]`` maximal ranges of the last axis where some row of bool ``x`` is True."""
    cols = x.reshape(-1, x.size(-1)).any(0)
    edges = torch.diff(cols.to(torch.int8), prepend=cols.new_zeros(1, dtype=torch.int8),
                       append=cols.new_zeros(1, dtype=torch.int8))
    bounds = edges.nonzero().flatten().tolist()
    return tuple(zip(bounds[0::2], bounds[1::2]))


def true_runs(x: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The column ranges where a bool mask ``[..., n]`` is True in some row, read once per
    tensor (for a key-padding mask: the key ranges that hold a padded key)."""
    return once(x, "true_runs", _true_runs)
