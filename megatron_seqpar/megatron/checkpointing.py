"""Rematerialization-aware checkpointing (LightSeq §3.3) for Megatron's activation recompute.

With ``recompute_granularity="full"`` Megatron's ``tensor_parallel.checkpoint`` runs each
layer forward under ``no_grad`` and re-runs it with grad in backward, so a distributed attention
would run its forward communication twice. ``Remat`` moves the checkpoint boundary to right
after attention: in the no-grad pass it runs the method's forward and keeps its output and
log-sum-exp (fp32, ``b·h·s``); in the recompute pass the cheap layer parts (norm, QKV
projection, RoPE) are recomputed as usual, but attention returns the kept output, and its
backward calls the method's own backward ``(dout, q, k, v, out, lse) -> (dq, dk, dv)``. The
distributed forward therefore runs once per step instead of twice; the backward's own
communication is unchanged. Saving = one forward's traffic per layer per step, e.g.
LightSeq's ``2(P-1)·s·b·hkv·D`` K/V elements. Measured (``tests/test_megatron_remat.py``:
GPT, 2 layers, CP=2, b=2, S=48, hkv=2, D=16, float64, bytes sent per rank and step): no
recompute 147,456 B; full recompute 196,608 B; full recompute + remat 147,456 B, i.e.
49,152 B saved (2 layers x 24,576 B of K/V), for LightSeq and for RSA (``remat=True``).

Two levels (``head_parallel = U > 1``, ``megatron_seqpar.headpar``): what is kept is the
method's (out, lse) in the outer layout; the method's forward (the traffic across the ``R``
outer groups, the inter-node part) still runs once. The recompute pass redoes one forward's
head all-to-alls inside the ``U``-rank inner group: the kept output back to the inner layout,
and the recomputed Q, K, V to the outer layout for the method's backward (keeping those
instead would cost their memory, which recompute exists to save). Measured
(``tests/test_megatron_two_level.py``, the GPT above at CP=4 = U2 x R2, every method): the
method's bytes equal the no-recompute step's, the all-to-all bytes exceed it by exactly
``(U-1)/U·b·s·(2hq + 2hkv)·D`` elements per layer (36,864 B per step and rank there).

Pairing. Kept entries form a FIFO per layer (pipeline schedules backward micro-batches in
forward order). The recompute pass checks that the entry was made from the same ``q``
(shape and an fp64 checksum); on a mismatch the stale entries are dropped and attention runs
normally, so a stray no-grad training forward can never feed a wrong output to a backward.

Memory: ``out`` (input dtype) + ``lse`` (fp32) + the gathered key-padding mask per layer and
in-flight micro-batch, kept from the no-grad forward to the layer's backward, plus whatever
else the method's backward needs: nothing for LightSeq and MQSP (on by default for them when
Megatron recomputes), the ``s x S`` score rows for RSA and the gathered K/V for LSS (so for
those two it is opt-in, ``remat=True``: it trades recompute's memory saving for the
communication). No collective of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

import megatron_seqpar as msp
from megatron_seqpar import common, registry


@dataclass(frozen=True)
class _Kept:
    key: tuple
    setup: object
    out: torch.Tensor  # [b, h, s, d], input dtype (what the method's own wrapper saves)
    lse: torch.Tensor
    kpm_all: torch.Tensor | None
    extra: tuple


def _fingerprint(q: torch.Tensor) -> tuple:
    return (tuple(q.shape), q.dtype, float(q.detach().double().sum()))


class _FromKept(torch.autograd.Function):
    """Returns the kept output; backward runs the method's backward on the recomputed q/k/v
    (with two levels, after the head all-to-all of the recomputed q/k/v and of dO)."""

    @staticmethod
    def forward(ctx, q, k, v, offset, kept, bwd):
        ctx.kept, ctx.bwd = kept, bwd
        ctx.dtypes, ctx.hkv = (q.dtype, k.dtype, v.dtype), k.size(2)
        ctx.save_for_backward(q, k, v, offset)
        return common.public_out(kept.setup, kept.out.to(q.dtype))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, offset = ctx.saved_tensors
        kept = ctx.kept
        qkv, _ = common.method_views(kept.setup, q, k, v)  # the recomputed q, k, v
        grads = common.run_backward(kept.setup, ctx.bwd, dout, qkv, kept.out.to(q.dtype),
                                    kept.lse, kept.kpm_all, kept.extra, ctx.dtypes, ctx.hkv,
                                    offset)
        return (*grads, None, None)


class Remat:
    """Per-layer keeper of (out, lse) between the no-grad forward and the recompute pass.

    ``remat(q, k, v, **attention_kwargs)`` behaves like ``msp.attention`` (public
    ``[b, s, h, d]`` layout); ``kept`` is the number of entries waiting for a backward.
    """

    def __init__(self, method: str):
        entry = registry.get(method)
        self.method = method
        self._fwd, self._bwd = entry.forward, entry.backward
        self._queue: deque[_Kept] = deque()

    @property
    def kept(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        self._queue.clear()

    def __call__(self, q, k, v, *, method, **kw):
        if method != self.method:
            raise ValueError(f"Remat built for {self.method!r} called for {method!r}")
        if not torch.is_grad_enabled():  # checkpoint's first pass: run once, keep out + lse
            _, setup = msp.api.prepare(q, k, v, method=method, **kw)
            key = _fingerprint(q)
            setup, _, o, lse, kpm_all, extra = common.run_forward(
                setup, self._fwd, q, k, v, kw.get("key_padding_mask"), kw.get("softmax_offset"))
            self._queue.append(_Kept(key, setup, o, lse, kpm_all, extra))
            return common.public_out(setup, o)
        key = _fingerprint(q) if self._queue else None
        while self._queue and self._queue[0].key != key:
            self._queue.popleft()  # stale (e.g. an abandoned no-grad forward)
        if self._queue:
            return _FromKept.apply(q, k, v, kw.get("softmax_offset"), self._queue.popleft(),
                                   self._bwd)
        return msp.attention(q, k, v, method=method, **kw)
