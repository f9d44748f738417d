"""Peer implementations, run on the same process group and the same local shards as ours.

All take and return the public layout ``[b, s, h, D]`` (this rank's shard) and are
differentiable in q, k, v:

- ``ulysses``: DeepSpeed-Ulysses, ``deepspeed.sequence.layer.DistributedAttention`` with
  ``scatter_idx=2, gather_idx=1`` (all-to-all heads <-> sequence), the local attention being
  PyTorch's fused SDPA on the whole sequence for ``h/P`` heads. Contiguous layout.
  Optional: needs ``pip install deepspeed`` (``DS_BUILD_OPS=0``).
- ``ring``: PyTorch's ring attention, ``torch.distributed.tensor.experimental.context_parallel``.
  On CPU, SDPA runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's
  context-parallel op table does not list; ``enable_cpu_ring()`` adds it and its backward, so
  they route through torch's own ``_templated_ring_attention(_backward)``. With causal
  masking torch load-balances with its head-tail sharding, which is our ``zigzag`` layout.
- ``allgather``: the naive scheme: all-gather K and V, attend locally, reduce-scatter dK/dV
  (CPU fused kernel ``aten._scaled_dot_product_flash_attention_for_cpu``: a CPU baseline).
- ``nosp``: one process, the whole sequence, fused SDPA (run it with 1 or 2 threads).

``BASELINES[name].layout(causal)`` says which layout the peer expects its shards in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

aten = torch.ops.aten
_CPU_FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def deepspeed_version() -> str | None:
    """The installed DeepSpeed version, or None when it is absent (the peer is then skipped)."""
    try:
        import importlib.metadata as md

        return md.version("deepspeed")
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


def _sdpa_bshd(q, k, v, causal, scale):
    """Fused SDPA on ``[b, s, h, D]`` (GQA by repeating kv heads when they differ)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    gqa = qh.shape[1] != kh.shape[1]
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- ulysses
@functools.lru_cache(maxsize=8)
def _ulysses_module(group, causal: bool, scale):
    import deepspeed.comm as ds_dist
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                 dist_init_required=False, verbose=False)

    def local(q, k, v, *args, **kwargs):
        return _sdpa_bshd(q, k, v, causal, scale)

    return DistributedAttention(local, group or dist.group.WORLD, scatter_idx=2, gather_idx=1)


def ulysses_attention(q, k, v, *, group=None, causal=True, scale=None):
    """DeepSpeed-Ulysses on ``[b, s, h, D]`` shards (contiguous layout); heads % P == 0."""
    return _ulysses_module(group, causal, scale)(q, k, v, batch_dim_idx=0)


# ----------------------------------------------------------------------------- torch ring
def enable_cpu_ring() -> None:
    """Register the CPU fused SDPA op (and backward) in torch's context-parallel op table."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    if _CPU_FWD in cp.custom_ops:
        return

    def spec_like(spec, local: torch.Tensor, seq_dim: int):
        shape = list(local.shape)
        shape[seq_dim] *= spec.mesh.size()
        meta = TensorMeta(torch.Size(shape), torch.empty(shape, device="meta").stride(),
                          local.dtype)
        return DTensorSpec(spec.mesh, spec.placements, tensor_meta=meta)

    def fwd_handler(op_call, args, kwargs):
        info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
        q, k, v, *rest = info.local_args
        dropout_p = rest[0] if rest else info.local_kwargs.get("dropout_p", 0.0)
        causal = rest[1] if len(rest) > 1 else info.local_kwargs.get("is_causal", False)
        out, lse = cp._templated_ring_attention(
            info.compute_mesh.get_group(), 2, _CPU_FWD, query=q, key=k, value=v,
            is_causal=causal, dropout_p=dropout_p, scale=info.local_kwargs.get("scale"))
        spec = args[0]._spec
        return DTensor._op_dispatcher.wrap(
            (out, lse), (spec_like(spec, out, 2), spec_like(spec, lse, 2)))

    def bwd_handler(op_call, args, kwargs):
        info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
        dout, q, k, v, out, lse, dropout_p, causal = info.local_args[:8]
        grads = cp._templated_ring_attention_backward(
            info.compute_mesh.get_group(), 2, _CPU_BWD, grad_out=dout, grad_out_name="grad_out",
            query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=causal,
            dropout_p=dropout_p, scale=info.local_kwargs.get("scale"))
        specs = tuple(spec_like(args[i]._spec, g, 2) for i, g in zip((1, 2, 3), grads[:3]))
        return DTensor._op_dispatcher.wrap(tuple(grads[:3]), specs)

    cp.custom_ops[_CPU_FWD] = fwd_handler
    cp.custom_ops[_CPU_BWD] = bwd_handler


@functools.lru_cache(maxsize=8)
def _mesh(group):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group or dist.group.WORLD, "cpu")


@contextlib.contextmanager
def ring_context(group=None, *, seq_len: int, causal: bool = True, rotate: str = "alltoall"):
    """torch's ``context_parallel`` context for a global length ``seq_len``.

    ``rotate``: ``"alltoall"`` (a true ring: K/V pass one hop per step) or ``"allgather"``
    (torch's default: one all-gather of K/V). The buffer handed to ``context_parallel`` is a
    dummy position vector without ``requires_grad`` (it only fixes the load balancer); the
    caller passes its own shards: zigzag (torch's head-tail balance) when causal, contiguous
    otherwise (torch balances causal attention only).
    """
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    enable_cpu_ring()
    cp.set_rotate_method(rotate)
    old = cp._cp_options.enable_load_balance
    cp._cp_options.enable_load_balance = causal
    dummy = torch.arange(seq_len, dtype=torch.float32)
    try:
        with context_parallel(_mesh(group), buffers=[dummy], buffer_seq_dims=[0],
                              no_restore_buffers={dummy}):
            yield
    finally:
        cp._cp_options.enable_load_balance = old


def ring_attention(q, k, v, *, group=None, causal=True, scale=None):
    """PyTorch ring attention on ``[b, s, h, D]`` shards; call inside ``ring_context``."""
    return _sdpa_bshd(q, k, v, causal, scale)


# ----------------------------------------------------------------------------- all-gather
class _AllGatherKV(torch.autograd.Function):
    """All-gather K and V (one packed buffer), attend the local queries, reduce-scatter dK/dV."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        kv = torch.stack([kh, vh])
        parts = [torch.empty_like(kv) for _ in range(P)]
        dist.all_gather(parts, kv, group=group)
        kv_all = torch.cat(parts, dim=3)  # [2, b, h, S, D]
        n = (r + 1) * q.shape[1] if causal else kv_all.shape[3]
        out, lse = _blocks_forward(qh, kv_all[0, :, :, :n], kv_all[1, :, :, :n], r, causal, scale)
        ctx.save_for_backward(qh, kv_all, out, lse)
        ctx.meta = (group, causal, scale, n, r, P)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        qh, kv_all, out, lse = ctx.saved_tensors
        group, causal, scale, n, r, P = ctx.meta
        s = qh.shape[2]
        do = dout.transpose(1, 2).contiguous()
        k_all, v_all = kv_all[0, :, :, :n], kv_all[1, :, :, :n]
        dq, dk, dv = _blocks_backward(do, qh, k_all, v_all, out, lse, r, causal, scale)
        dkv = torch.zeros((2, *kv_all.shape[1:3], P * s, kv_all.shape[4]), dtype=dk.dtype)
        dkv[0, :, :, :n], dkv[1, :, :, :n] = dk, dv
        chunks = [c.contiguous() for c in dkv.split(s, dim=3)]
        own = torch.empty_like(chunks[0])
        if dist.get_backend(group) == "nccl":
            dist.reduce_scatter(own, chunks, group=group)
        else:
            _rs_gloo(own, chunks, group)
        return (dq.transpose(1, 2), own[0].transpose(1, 2), own[1].transpose(1, 2),
                None, None, None)


def _rs_gloo(out, chunks, group):
    """Reduce-scatter on gloo: one all_to_all of the chunks and a local sum."""
    recv = torch.empty((len(chunks), *chunks[0].shape), dtype=chunks[0].dtype)
    dist.all_to_all_single(recv, torch.stack(chunks), group=group)
    out.copy_(recv.sum(0))


def _blocks_forward(q, k, v, r, causal, scale):
    """Local queries (rank r, contiguous) against keys ``[0, n)``: prefix block + diagonal."""
    s = q.shape[2]
    if not causal or r == 0:
        return _CPU_FWD(q, k, v, 0.0, causal, scale=scale)
    o1, l1 = _CPU_FWD(q, k[:, :, : r * s], v[:, :, : r * s], 0.0, False, scale=scale)
    o2, l2 = _CPU_FWD(q, k[:, :, r * s:], v[:, :, r * s:], 0.0, True, scale=scale)
    lse = torch.logaddexp(l1, l2)
    out = o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)
    return out, lse


def _blocks_backward(do, q, k, v, out, lse, r, causal, scale):
    s = q.shape[2]
    if not causal or r == 0:
        return _CPU_BWD(do, q, k, v, out, lse, 0.0, causal, scale=scale)
    a = _CPU_BWD(do, q, k[:, :, : r * s], v[:, :, : r * s], out, lse, 0.0, False, scale=scale)
    b = _CPU_BWD(do, q, k[:, :, r * s:], v[:, :, r * s:], out, lse, 0.0, True, scale=scale)
    return a[0] + b[0], torch.cat([a[1], b[1]], 2), torch.cat([a[2], b[2]], 2)


def allgather_attention(q, k, v, *, group=None, causal=True, scale=None):
    """Naive SP: all-gather K/V, local attention, reduce-scatter dK/dV (contiguous layout)."""
    return _AllGatherKV.apply(q, k, v, group, causal, scale)


def nosp_attention(q, k, v, *, group=None, causal=True, scale=None):
    """One process, whole sequence, fused SDPA."""
    return _sdpa_bshd(q, k, v, causal, scale)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Baseline:
    """A peer: ``fn(q, k, v, group=, causal=, scale=)``, its layout and its availability."""

    name: str
    fn: Callable
    needs: str | None = None  # the optional package it needs

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"bad baseline name {self.name!r}")

    def layout(self, causal: bool) -> str:
        return "zigzag" if self.name == "ring" and causal else "contiguous"

    def available(self) -> bool:
        return self.needs is None or deepspeed_version() is not None

    def context(self, group=None, *, seq_len: int, causal: bool = True):
        """The context the call must run in (torch ring needs ``context_parallel``)."""
        if self.name == "ring":
            return ring_context(group, seq_len=seq_len, causal=causal)
        return contextlib.nullcontext()


BASELINES = {
    "ulysses": Baseline("ulysses", ulysses_attention, needs="deepspeed"),
    "ring": Baseline("ring", ring_attention),
    "allgather": Baseline("allgather", allgather_attention),
    "nosp": Baseline("nosp", nosp_attention),
}
