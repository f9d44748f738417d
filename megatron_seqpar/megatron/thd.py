"""Packed (THD) sequences in megatron-core without Transformer Engine.

megatron-core describes a packed batch with ``PackedSeqParams(qkv_format="thd", ...)``:
``cu_seqlens_q_padded`` = boundaries ``[0, P1, P1+P2, ..., T]`` of the *padded* stream (where
every token sits; under CP each padded length is a multiple of ``2*CP``), ``cu_seqlens_q`` =
the cumulative *real* lengths ``[0, L1, L1+L2, ...]`` (``L_i <= P_i``): sequence ``i`` holds
real tokens at padded positions ``[cu_padded[i], cu_padded[i] + L_i)`` and padding after them.
Without ``cu_seqlens_q_padded`` there is no padding. ``max_seqlen_q`` sizes RoPE's table.

Under CP the stream is cut over the ranks in one of two layouts (``PACKINGS``):

- ``zigzag`` (the default, Transformer Engine's): every sequence is cut into ``2*CP`` chunks and
  rank ``r`` holds chunks ``r`` and ``2*CP-1-r`` of each, in sequence order (TE's
  ``thd_get_partitioned_indices``, which ``megatron.core.utils.get_thd_batch_on_this_cp_rank``
  calls and which asserts TE is installed when CP > 1); every padded length a multiple of 2*CP;
- ``balanced`` (``megatron_seqpar.balance``): short documents stay whole on one rank, long ones
  are split; every rank holds ``T/CP`` tokens, lengths need not be multiples of anything. The
  batch says so with ``SeqParPackedSeqParams(layout="balanced")``, which the provider reads.
  megatron-core's THD RoPE assumes zigzag, so under balanced learned absolute positions have
  their position ids sharded with the tokens, and RoPE is rotated by the provider at
  ``document_positions`` (``megatron_seqpar.megatron.rope``).

This module gives pure-torch replacements for TE's two functions, and ``packed_attention_args``,
which turns ``PackedSeqParams`` into ``msp.attention``'s ``cu_seqlens``, key padding mask and
layout. Nothing here communicates or holds state (one small cache of masks keyed by the
boundaries' values; host reads memoised per tensor by ``hostread``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_seqpar.flag_rules import PACKINGS
from megatron_seqpar.hostread import host_ints
from megatron_seqpar.layouts import documents, local_runs, positions


@dataclass
class SeqParPackedSeqParams(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` plus the CP layout the batch was sharded with
    (``layout``: one of ``PACKINGS``; plain ``PackedSeqParams`` means ``zigzag``)."""

    layout: str = "zigzag"

    def __post_init__(self):
        if self.layout not in PACKINGS:
            raise ValueError(f"unknown packing layout {self.layout!r}; use one of {PACKINGS}")


def packed_seq_params(cu_seqlens, cu_seqlens_padded, max_seqlen: int,
                      layout: str = "zigzag") -> PackedSeqParams:
    """THD params for self attention over one packed stream (the same boundaries for q and
    kv): megatron-core's own class for ``zigzag``, ``SeqParPackedSeqParams`` otherwise."""
    kw = dict(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
              cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
              max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    if layout == "zigzag":
        return PackedSeqParams(**kw)
    return SeqParPackedSeqParams(**kw, layout=layout)


def _host_ints(x, name: str) -> tuple[int, ...]:
    """A 1-d (or ``[1, n+1]``) integer tensor or sequence as a tuple of ints."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {x.dtype}; pass "
                             "torch.tensor([0, L1, L1+L2, ...], dtype=torch.int32)")
        if x.dim() != 1 and not (x.dim() == 2 and x.size(0) == 1):
            raise ValueError(f"{name} must be 1-d [n+1], got shape {tuple(x.shape)}")
        return host_ints(x)  # once per tensor: every layer of a step passes the same one
    try:
        return tuple(int(v) for v in x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-d integer tensor [0, L1, L1+L2, ...]") from None


def _check_padded(cu: tuple[int, ...], name: str, total: int | None, cp_size: int,
                  layout: str = "zigzag") -> None:
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing (cumulative sequence "
                         f"lengths [0, L1, L1+L2, ...]), got {list(cu[:6])}")
    if total is not None and cu[-1] != total:
        raise ValueError(f"{name} ends at {cu[-1]} but the packed batch holds {total} tokens; "
                         "its last entry must be the total number of (padded) tokens: pad the "
                         "last sequence or append a padding sequence")
    if cp_size > 1 and layout == "zigzag":
        bad = [b - a for a, b in zip(cu, cu[1:]) if (b - a) % (2 * cp_size)]
        if bad:
            raise ValueError(f"with context parallel size {cp_size} every padded sequence length "
                             f"in {name} must be a multiple of 2*CP = {2 * cp_size}, got "
                             f"{bad[:4]}; pad each sequence to that multiple (zigzag layout) or "
                             "shard with the balanced layout (--seqpar-packing balanced)")


def thd_get_partitioned_indices(cu_seqlens_padded, total_tokens: int, cp_size: int,
                                cp_rank: int) -> torch.Tensor:
    """Stream indices of the ``total_tokens / cp_size`` tokens rank ``cp_rank`` holds (int32,
    on ``cu_seqlens_padded``'s device): for each sequence ``i`` of padded length ``P_i``
    (a multiple of ``2*cp_size``), chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of its
    ``2*cp_size`` equal chunks, sequences in order. Same result as Transformer Engine's
    ``tex.thd_get_partitioned_indices``; ``ValueError`` instead of a device assert."""
    return partitioned_indices(cu_seqlens_padded, total_tokens, cp_size, cp_rank, "zigzag")


def get_thd_batch_on_this_cp_rank(batch: dict[str, Any], cu_seqlens, cu_seqlens_padded,
                                  max_seqlen, cp_size: int | None = None,
                                  cp_rank: int | None = None, layout: str = "zigzag"):
    """Drop-in for ``megatron.core.utils.get_thd_batch_on_this_cp_rank`` that needs no
    Transformer Engine: ``(batch, PackedSeqParams)``.

    ``batch`` tensors are ``[1, T]`` (THD: one packed row); under CP each is cut in place with
    the ``layout``'s indices (``zigzag``: ``thd_get_partitioned_indices``; ``balanced``:
    ``megatron_seqpar.balance``) along dim 1, except the keys ``attention_mask``,
    ``cu_seqlens``, ``cu_seqlens_padded`` and ``max_seqlen`` (as megatron-core does).
    ``max_seqlen``: a ``[1]`` tensor or an int. ``cp_size``/``cp_rank`` default to
    ``parallel_state``'s. The params say the layout (``packed_seq_params``).
    """
    from megatron.core import parallel_state

    if layout not in PACKINGS:
        raise ValueError(f"unknown packing layout {layout!r}; use one of {PACKINGS}")
    m = host_ints(max_seqlen)[0] if isinstance(max_seqlen, torch.Tensor) else int(max_seqlen)
    params = packed_seq_params(cu_seqlens, cu_seqlens_padded, m, layout)
    cp_size = parallel_state.get_context_parallel_world_size() if cp_size is None else cp_size
    cp_rank = parallel_state.get_context_parallel_rank() if cp_rank is None else cp_rank
    if cp_size > 1:
        index = partitioned_indices(cu_seqlens_padded, batch["tokens"].size(1), cp_size,
                                    cp_rank, layout)
        for key, data in batch.items():
            if key in {"attention_mask", "cu_seqlens", "cu_seqlens_padded", "max_seqlen"}:
                continue
            if data is not None:
                batch[key] = data.index_select(1, index.to(data.device))
    return batch, params


def partitioned_indices(cu_seqlens_padded, total_tokens: int, cp_size: int, cp_rank: int,
                        layout: str = "zigzag") -> torch.Tensor:
    """Stream indices (int32, on ``cu_seqlens_padded``'s device) of the tokens ``cp_rank``
    holds in ``layout``, in local order; ``ValueError`` naming the fix for a bad rank, a total
    the layout cannot cut evenly or boundaries it cannot take."""
    cu = _host_ints(cu_seqlens_padded, "cu_seqlens_padded")
    if not isinstance(cp_size, int) or cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, "
                         f"cp_size={cp_size}")
    unit, what = ((2 * cp_size, f"2*CP = {2 * cp_size}") if layout == "zigzag" else
                  (cp_size, f"CP = {cp_size} (every rank holds T/CP tokens); pad the stream's "
                   "end"))
    if total_tokens <= 0 or total_tokens % unit:
        raise ValueError(f"total_tokens={total_tokens} must be a positive multiple of {what}")
    _check_padded(cu, "cu_seqlens_padded", total_tokens, cp_size, layout)
    device = cu_seqlens_padded.device if isinstance(cu_seqlens_padded, torch.Tensor) else None
    runs = local_runs(layout, cp_rank, cp_size, total_tokens // cp_size, cu)
    return positions(runs, device).to(torch.int32)


@lru_cache(maxsize=64)
def document_positions(cu_padded: tuple[int, ...], cp_rank: int, cp_size: int, local_len: int,
                       layout: str) -> torch.Tensor:
    """``[local_len]`` long: each of this rank's tokens' position in its (padded) sequence, in
    local order (host tensor, cached: the same object for the same boundaries)."""
    runs = local_runs(layout, cp_rank, cp_size, local_len, cu_padded)
    starts = torch.tensor(cu_padded[:-1], dtype=torch.long)
    return positions(runs) - starts[documents(runs)]


@lru_cache(maxsize=64)
def _padding_mask(cu_padded: tuple[int, ...], cu_real: tuple[int, ...], cp_rank: int,
                  cp_size: int, local_len: int, layout: str) -> torch.Tensor:
    """``[1, local_len]`` bool, True = a padding token of this rank (host tensor)."""
    runs = local_runs(layout, cp_rank, cp_size, local_len, cu_padded)
    real = torch.tensor([b - a for a, b in zip(cu_real, cu_real[1:])], dtype=torch.long)
    pos = document_positions(cu_padded, cp_rank, cp_size, local_len, layout)
    return (pos >= real[documents(runs)])[None]


def packed_attention_args(params, local_len: int, cp_rank: int, cp_size: int):
    """``(cu_seqlens, key_padding_mask, layout)`` for ``msp.attention`` from megatron-core THD
    ``PackedSeqParams`` on a rank holding ``local_len`` tokens.

    ``cu_seqlens`` = the padded boundaries (positions of the stream, as a tuple); the mask
    (``[1, local_len]`` bool, True = padding) marks the tokens past each sequence's real
    length, or is None when no sequence has padding; ``layout`` = the params' (``zigzag``
    unless ``SeqParPackedSeqParams`` says ``balanced``; ``contiguous`` at CP=1). Raises
    ``ValueError`` naming the fix for a format other than ``thd``, K/V boundaries that differ
    from Q's (self attention), real lengths longer than the padded ones, boundaries that do not
    cover the ``CP * local_len`` tokens or (under CP, zigzag) padded lengths that are not
    multiples of ``2*CP``, and a ``max_seqlen_q``/``max_seqlen_kv`` below the longest padded
    sequence (RoPE's table would not cover it). Reads the boundaries on the host once per
    tensor (``hostread``: for CUDA tensors one device sync per step, the first layer's, not one
    per layer; a kv tensor that IS the q tensor is not read twice).
    """
    fmt = getattr(params, "qkv_format", None)
    if fmt != "thd":
        raise ValueError(f"PackedSeqParams(qkv_format={fmt!r}) is not supported; sequence-"
                         "parallel core attention takes packed THD batches, "
                         "qkv_format='thd' (or no packed_seq_params for sbhd batches)")
    if params.cu_seqlens_q is None:
        raise ValueError("PackedSeqParams.cu_seqlens_q is missing: pass the cumulative real "
                         "sequence lengths [0, L1, L1+L2, ...]")
    real = _host_ints(params.cu_seqlens_q, "cu_seqlens_q")
    padded = real if params.cu_seqlens_q_padded is None else \
        _host_ints(params.cu_seqlens_q_padded, "cu_seqlens_q_padded")
    for name, q_val, q_t, kv in (
            ("cu_seqlens_kv", real, params.cu_seqlens_q, params.cu_seqlens_kv),
            ("cu_seqlens_kv_padded", padded, params.cu_seqlens_q_padded,
             params.cu_seqlens_kv_padded)):
        # the same tensor (get_thd_batch_on_this_cp_rank's case) needs no second host read
        if kv is not None and kv is not q_t and _host_ints(kv, name) != q_val:
            raise ValueError(f"{name} differs from its query twin: self attention over packed "
                             "sequences needs the same boundaries for q and kv; pass the same "
                             "tensor for both (as get_thd_batch_on_this_cp_rank does)")
    layout = getattr(params, "layout", "zigzag")
    if layout not in PACKINGS:
        raise ValueError(f"unknown packing layout {layout!r}; use one of {PACKINGS}")
    if cp_size == 1:
        layout = "contiguous"  # one rank holds the stream in order, whatever the layout
    pname = "cu_seqlens_q" if params.cu_seqlens_q_padded is None else "cu_seqlens_q_padded"
    _check_padded(padded, pname, cp_size * local_len, cp_size, layout)
    if len(real) != len(padded):
        raise ValueError(f"cu_seqlens_q has {len(real) - 1} sequences but cu_seqlens_q_padded "
                         f"has {len(padded) - 1}; both describe the same sequences")
    if real[0] != 0:
        raise ValueError(f"cu_seqlens_q must start at 0 (cumulative real lengths [0, L1, "
                         f"L1+L2, ...]), got {list(real[:6])}")
    lens = [b - a for a, b in zip(real, real[1:])]
    plens = [b - a for a, b in zip(padded, padded[1:])]
    if any(n < 0 or n > p for n, p in zip(lens, plens)):
        raise ValueError("cu_seqlens_q must be the cumulative REAL lengths, each at most the "
                         f"padded length in cu_seqlens_q_padded; got real {lens[:6]} vs padded "
                         f"{plens[:6]}")
    longest = max(plens)
    for name in ("max_seqlen_q", "max_seqlen_kv"):
        m = getattr(params, name, None)
        if m is not None and int(m) < longest:
            raise ValueError(f"{name}={int(m)} is below the longest padded sequence ({longest}); "
                             f"set it to max(cu_seqlens_padded[1:] - cu_seqlens_padded[:-1])")
    kpm = None
    if real != padded:
        kpm = _padding_mask(padded, real, cp_rank, cp_size, local_len, layout)
    return padded, kpm, layout
