"""LSS (Long-Short Sequence Transformer, Wang et al. 2023): the attention op.

Each rank owns one segment of the sequence (its queries). Forward: ONE fused all-gather of a
packed ``[K; V]`` buffer gives every rank the whole sequence's keys and values; the local
queries attend all of them (causal mask by global position, key padding). Backward: the same
blocks in reverse give dQ locally and this rank's share of every segment's dK/dV, returned to
their owners by ONE fused reduce-scatter of a packed ``[dK; dV]`` buffer. Exact.

The other half of LSS, *double gradient averaging* of the parameters (sequence group, then
data-parallel group), lives in the Megatron integration (``megatron_seqpar.megatron``), not in
this op.

Per rank and call: forward sends ``(P-1)·2·s·b·hkv·D`` elements (all-gather), backward
``(P-1)/P·2·S·b·hkv·D`` in the accumulation dtype (reduce-scatter). Memory: the gathered K and
V, ``2·S·b·hkv·D``, are kept for the backward (that is the method's activation cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_seqpar.api import BaseOptions
from megatron_seqpar.common import run_method
from megatron_seqpar.kernels import attend, attend_backward
from megatron_seqpar.layouts import shift_runs


@dataclass(frozen=True)
class Options(BaseOptions):
    """LSS has no options beyond the kernel backend."""


def _all_runs(setup, s):
    return tuple(r for j in range(setup.world_size) for r in shift_runs(setup.runs(j, s), j * s))


def _flat_kpm(kpm_all):
    return None if kpm_all is None else kpm_all.permute(1, 0, 2).reshape(kpm_all.size(1), -1)


def lss_forward(setup, q, k, v, kpm_all):
    comm, s = setup.comm(), q.size(2)
    b, hkv, _, d = k.shape
    kv = comm.all_gather(torch.stack([k, v]))  # [P, 2, b, hkv, s, d], one collective
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, b, hkv, setup.world_size * s, d)
    out, lse = attend(q, setup.runs(setup.rank, s), kv[0], kv[1], _all_runs(setup, s),
                      scale=setup.scale, causal=setup.causal, kpm=_flat_kpm(kpm_all),
                      backend=setup.options.backend)
    if setup.traffic:
        setup.traffic.add_block_steps(1)
    return out, lse, (kv,)


def lss_backward(setup, dout, q, k, v, out, lse, kpm_all, kv):
    comm, s, P = setup.comm(), q.size(2), setup.world_size
    b, hkv, _, d = k.shape
    dq, dk_all, dv_all = attend_backward(
        dout, q, setup.runs(setup.rank, s), kv[0], kv[1], _all_runs(setup, s), out, lse,
        scale=setup.scale, causal=setup.causal, kpm=_flat_kpm(kpm_all),
        backend=setup.options.backend)
    dkv = torch.stack([dk_all, dv_all]).view(2, b, hkv, P, s, d).permute(3, 0, 1, 2, 4, 5)
    dkv = comm.reduce_scatter(dkv)  # [2, b, hkv, s, d], one collective
    return dq, dkv[0], dkv[1]


def apply(q, k, v, key_padding_mask, setup):
    return run_method(lss_forward, lss_backward, q, k, v, key_padding_mask, setup)
