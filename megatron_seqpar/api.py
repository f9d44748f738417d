"""The functional entry point ``attention()``: validation and dispatch by method name.

Each method lives in the module of the same name (``megatron_seqpar/<method>.py``) and declares
its ``METHOD`` (name, frozen ``Options``, forward, backward) once; ``megatron_seqpar.registry``
lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_seqpar import headpar
from megatron_seqpar.comm import Comm, Traffic, current_traffic, failure_hint, staging_enabled
from megatron_seqpar.headpar import TwoLevelGroups, check_split, two_level_runs
from megatron_seqpar.kernels import check_window, count_blocks, key_pad, sees_matrix
from megatron_seqpar.layouts import LAYOUTS, Run, check_cu_seqlens, check_layout, local_runs
from megatron_seqpar.registry import METHODS, get


@dataclass(frozen=True)
class Setup:
    """Everything a method needs besides the tensors; built by ``attention()``."""

    group: Any
    rank: int
    world_size: int
    causal: bool
    scale: float
    layout: str
    options: Any
    traffic: Traffic | None
    staged: bool = False  # comm.stage_through_host() was active (tests: ranks share a GPU)
    cu_seqlens: tuple[int, ...] | None = None  # packed-sequence boundaries of the stream
    head_parallel: int = 1  # U; then group/rank/world_size are the OUTER group's
    inner_group: Any = None  # the head all-to-all group when head_parallel > 1
    # per (outer) rank, the local key ranges holding a padded key (host; None = not known)
    key_pads: tuple | None = None
    window: tuple[int, int] | None = None  # sliding window (left, right), checked

    @property
    def mask(self) -> dict:
        """The visibility keywords of ``kernels.attend``/``plan_blocks``: ``causal``,
        ``window``."""
        return dict(causal=self.causal, window=self.window)

    def comm(self) -> Comm:
        return Comm(self.group, self.traffic, staged=self.staged)

    def inner_comm(self) -> Comm:
        return Comm(self.inner_group, self.traffic, staged=self.staged)

    def key_pad(self, kpm_all, j: int):
        """Rank ``j``'s key padding for the kernels (``kernels.key_pad``): None where rank
        ``j``'s keys hold no padding, so its blocks run unmasked."""
        return key_pad(kpm_all, j, self.key_pads)

    def sees(self, i: int, j: int, local_len: int) -> bool:
        """Whether (outer) rank ``i``'s queries see any of rank ``j``'s keys (a non-empty
        block: the same answer on every rank, from positions alone)."""
        return count_blocks(self.runs(i, local_len), self.runs(j, local_len), self.causal,
                            self.window) > 0

    def pair_ranges(self, rule, local_len: int):
        """``rule`` (``kernels.key_ranges``, ``query_ranges``) of the (outer) ranks' runs; None
        without a window or packing (every rank pair then sees whole shards) or when the rule
        says the ranges add up to them: the dense collectives apply."""
        if self.window is None and self.cu_seqlens is None:
            return None
        return rule(tuple(self.runs(j, local_len) for j in range(self.world_size)), self.causal,
                    self.window, local_len)

    def sees_matrix(self, local_len: int) -> list[list[bool]]:
        """``kernels.sees_matrix`` of the (outer) ranks: ``[i][j]`` = ``sees(i, j)``."""
        return sees_matrix([self.runs(j, local_len) for j in range(self.world_size)],
                           self.causal, self.window)

    def runs(self, rank: int, local_len: int) -> tuple[Run, ...]:
        """Position runs of (outer) rank ``rank``'s ``local_len`` tokens."""
        if self.head_parallel == 1:
            return local_runs(self.layout, rank, self.world_size, local_len, self.cu_seqlens)
        return two_level_runs(self.layout, rank, self.world_size * self.head_parallel,
                              self.head_parallel, local_len, self.cu_seqlens)


def method_options(method: str) -> type:
    """The frozen options dataclass of ``method`` (all fields have defaults)."""
    return get(method).Options


def _check_inputs(q, k, v, kpm) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, seq, heads, head_dim]")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v differ in batch, length or heads: {tuple(k.shape)} vs "
                         f"{tuple(v.shape)} (only their head dims may differ, as in MLA)")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and "
                         "head_dim")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k/v local lengths differ ({q.shape[1]} vs {k.shape[1]}): "
                         "self-attention needs the same local tokens for all three")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by kv heads {k.shape[2]}; "
                         "use a number of query groups that divides the attention heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ ({q.device}, {k.device}, {v.device})")
    if not q.is_floating_point():
        raise ValueError(f"attention needs floating point inputs, got {q.dtype}")
    if kpm is not None:
        if kpm.dtype != torch.bool or tuple(kpm.shape) != (q.shape[0], q.shape[1]):
            raise ValueError("key_padding_mask must be a bool tensor [batch, local_seq] "
                             f"(True = padded), got {kpm.dtype} {tuple(kpm.shape)}")
        if kpm.device != q.device:
            raise ValueError(f"key_padding_mask is on {kpm.device}, q on {q.device}")


_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_offset(offset, q) -> None:
    if offset is None:
        return
    if not isinstance(offset, torch.Tensor) or not offset.is_floating_point():
        raise ValueError("softmax_offset must be a float tensor [query heads] (one extra logit "
                         "per head; zeros = Megatron's off-by-one softmax)")
    if tuple(offset.shape) != (q.shape[2],):
        raise ValueError(f"softmax_offset must have shape [{q.shape[2]}] (the query heads of q "
                         f"as passed), got {tuple(offset.shape)}")
    if offset.device != q.device:
        raise ValueError(f"softmax_offset is on {offset.device}, q on {q.device}; move it to "
                         "q's device")


def _check_across_ranks(group, q, k, v, method, layout, causal, kpm, cu, head_parallel, window,
                        offset) -> None:
    """One tiny all-reduce proving every rank agrees on shapes and settings.

    Skipped for CUDA tensors (it would add a host sync per call; Megatron's batch sharding
    already guarantees equal shapes there).
    """
    left, right = window or (-1, -1)
    code = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
            _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 9, METHODS.index(method),
            LAYOUTS.index(layout), int(causal), int(kpm is not None), head_parallel,
            -1 if cu is None else len(cu),
            -1 if cu is None else sum((i + 1) * c for i, c in enumerate(cu)) % (2**61 - 1),
            left, right, int(offset is not None)]
    t = torch.tensor(code + [-c for c in code], dtype=torch.int64)
    with failure_hint("the shape check"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = t[: len(code)].tolist(), [-c for c in t[len(code):].tolist()]
    names = ["batch", "local seq length", "query heads", "kv heads", "head dim", "v head dim",
             "dtype", "method", "layout", "causal", "key_padding_mask given", "head_parallel",
             "cu_seqlens entries", "cu_seqlens values", "window left", "window right",
             "softmax_offset given"]
    bad = [f"{n} ({a}..{b})" for n, a, b in zip(names, lo, hi) if a != b]
    if bad:
        raise ValueError("ranks of the sequence group disagree on " + ", ".join(bad) +
                         ": every rank must pass equally shaped shards (pad the sequence to a "
                         "multiple of the layout) and the same settings")


def attention(q, k, v, *, method, group=None, causal=True, softmax_scale=None,
              layout="contiguous", key_padding_mask=None, options=None, cu_seqlens=None,
              two_level_groups=None, key_padding_ranges=None, window_size=None,
              softmax_offset=None):
    """Exact self-attention over the whole sequence, from this rank's shard.

    ``q``: ``[b, s, hq, D]``, ``k``/``v``: ``[b, s, hkv, D]`` (this rank's tokens in
    ``layout``); returns ``[b, s, hq, D]`` in q's dtype, differentiable in q, k, v.
    ``key_padding_mask``: ``[b, s]`` bool, True = padded key. ``options``: the method's
    ``Options`` (see ``method_options``). Collectives run on ``group`` (default group if None).
    ``cu_seqlens``: packed sequences, the global stream's boundaries ``[0, L1, ..., S]`` (the
    same on every rank and batch row); attention stays inside each sequence.
    ``options.head_parallel = U > 1``: two levels (``megatron_seqpar.headpar``); its inner and
    outer groups are built from ``group`` once and cached, or given as ``two_level_groups``
    (a ``headpar.TwoLevelGroups``, e.g. Megatron's hierarchical CP groups).
    ``key_padding_ranges``: optional host-side description of ``key_padding_mask`` for CUDA
    tensors, one tuple of ``(lo, hi)`` local key ranges per rank of ``group`` (every range
    that holds a padded key in some batch row; ``()`` = none), the same on every rank: blocks
    whose keys miss them run unmasked (the flash kernel) without reading the mask on the host.
    It must describe the mask (the Megatron provider derives it from the full-length mask once
    per step); for CPU tensors it is not needed and not used (the gathered mask is read).
    ``window_size=(left, right)``: a sliding window in global positions (key ``j`` visible to
    query ``i`` only if ``i - left <= j <= i + right``; -1 = that side unbounded); blocks and
    transfers it leaves empty are skipped. ``softmax_offset``: ``[hq]`` float tensor, the same
    on every rank: one extra logit per head in every row's softmax denominator (attention
    sinks; zeros = off-by-one softmax); differentiable, each rank's gradient is its local
    queries' part (summed over the group it is the full gradient). ``v`` may have another
    head dim than ``q``/``k`` (MLA): the output takes ``v``'s, the default scale stays
    ``q``'s ``D**-0.5``.
    """
    entry, setup = prepare(q, k, v, method=method, group=group, causal=causal,
                           softmax_scale=softmax_scale, layout=layout,
                           key_padding_mask=key_padding_mask, options=options,
                           cu_seqlens=cu_seqlens, two_level_groups=two_level_groups,
                           key_padding_ranges=key_padding_ranges, window_size=window_size,
                           softmax_offset=softmax_offset)
    return entry.apply(q, k, v, key_padding_mask, setup, softmax_offset)


def prepare(q, k, v, *, method, group=None, causal=True, softmax_scale=None,
            layout="contiguous", key_padding_mask=None, options=None, cu_seqlens=None,
            two_level_groups=None, key_padding_ranges=None, window_size=None,
            softmax_offset=None):
    """Validate ``attention``'s arguments and build its ``Setup``: ``(registry entry, setup)``
    (also used by ``megatron_seqpar.megatron.checkpointing``)."""
    entry = get(method)
    check_layout(layout)
    _check_inputs(q, k, v, key_padding_mask)
    _check_offset(softmax_offset, q)
    window = check_window(window_size)
    opts = entry.Options() if options is None else options
    if not isinstance(opts, entry.Options):
        raise ValueError(f"options for {method!r} must be a megatron_seqpar.{method}.Options, "
                         f"got {type(opts).__name__}")
    comm = Comm(group, staged=staging_enabled())
    if layout == "zigzag" and comm.world_size > 1 and q.shape[1] % 2:
        raise ValueError(f"zigzag layout needs an even local length, got {q.shape[1]}: make the "
                         f"sequence length a multiple of 2*P = {2 * comm.world_size}")
    cu = check_cu_seqlens(cu_seqlens, comm.world_size * q.shape[1], layout, comm.world_size)
    U = opts.head_parallel
    check_split(comm.world_size, U, q.shape[2])
    comm.join_nccl(q.device)  # before any rank may skip a point-to-point batch
    if comm.world_size > 1 and not q.is_cuda:
        _check_across_ranks(group, q, k, v, method, layout, causal, key_padding_mask, cu, U,
                            window, softmax_offset)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    outer, inner, rank, world = group, None, comm.rank, comm.world_size
    if U > 1:
        groups = two_level_groups if two_level_groups is not None else \
            headpar.two_level_groups(group, U)
        if not isinstance(groups, TwoLevelGroups):
            raise ValueError("two_level_groups must be a megatron_seqpar.headpar.TwoLevelGroups")
        outer, inner = groups.outer, groups.inner
        ci, co = Comm(inner, staged=comm.staged), Comm(outer, staged=comm.staged)
        if (ci.world_size, co.world_size, ci.rank, co.rank) != \
                (U, comm.world_size // U, comm.rank % U, comm.rank // U):
            raise ValueError(f"two_level_groups do not match head_parallel={U} over "
                             f"{comm.world_size} ranks: the inner groups must be U consecutive "
                             "ranks of the sequence group and the outer groups the P/U ranks at "
                             "the same place in them (Megatron's hierarchical CP order)")
        ci.join_nccl(q.device)
        co.join_nccl(q.device)
        rank, world = co.rank, co.world_size
    pads = _key_pads(key_padding_ranges, key_padding_mask, comm.world_size, U, q.shape[1])
    return entry, Setup(outer, rank, world, bool(causal), scale, layout, opts, current_traffic(),
                        comm.staged, cu, U, inner, pads, window)


def _key_pads(ranges, kpm, P: int, U: int, s: int):
    """``key_padding_ranges`` validated, then regrouped per outer rank with two levels (outer
    rank ``j``'s key buffer is the ``U`` inner ranks' shards one after another)."""
    if ranges is None:
        return None
    if kpm is None:
        raise ValueError("key_padding_ranges describes a key_padding_mask: pass both or neither")
    try:
        ranges = tuple(tuple((int(lo), int(hi)) for lo, hi in r) for r in ranges)
    except (TypeError, ValueError):
        raise ValueError("key_padding_ranges must hold, per rank, a tuple of (lo, hi) int "
                         "pairs") from None
    if len(ranges) != P or any(not 0 <= lo < hi <= s for r in ranges for lo, hi in r):
        raise ValueError(f"key_padding_ranges needs one tuple of (lo, hi) ranges with "
                         f"0 <= lo < hi <= {s} per rank of the group ({P}), got {ranges!r:.200}")
    return tuple(tuple((lo + i * s, hi + i * s) for i in range(U) for lo, hi in ranges[j * U + i])
                 for j in range(P // U))

