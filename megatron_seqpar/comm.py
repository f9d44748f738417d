"""Communication on an explicit process group, with byte accounting.

``Comm(group, traffic)`` wraps the few patterns the methods use:

- ``post(sends, recvs)``: point-to-point transfers (one ``batch_isend_irecv`` on NCCL, the
  group's own ``send``/``recv`` on gloo), returned as a ``Pending`` to wait on later, so step
  ``t+1``'s transfer overlaps step ``t``'s compute. No ``cuda.synchronize``; waits honour the
  group's timeout.
- ``all_gather(x)`` -> ``[P, *x.shape]``, ``all_gather_inplace(out)`` (this rank's data already
  in ``out[rank]``: no input buffer) and ``all_gather_post(out)`` (the same, returned as a
  ``Pending``), ``reduce_scatter(x)`` of ``[P, *shape]`` -> ``shape``
  (sum), ``all_reduce_(x, op)``, ``all_to_all(x)`` of ``[P, *shape]`` (two-level heads). NCCL
  runs its native collectives (all-gather in place). gloo stages all-gather and
  reduce-scatter through a P-fold temporary copy, so there they are batched point-to-point
  transfers straight into and out of the caller's buffers (P-1 pairwise steps with one
  chunk-sized receive buffer for the reduce-scatter): the same bytes, no staging memory.

CUDA with NCCL: every transfer runs on a side stream of the ``Comm`` (from PyTorch's stream
pool, made on first use: nothing at import). The side stream first waits on the compute
stream (an event: what is sent has been written), the transfer is issued there, the buffers
are ``record_stream``-ed to it, and ``Pending.wait()`` makes the compute stream wait on the
side stream and NCCL's work (device-side waits: no host synchronisation, capturable in CUDA
graphs). Collectives do the same and return with the compute stream already waiting.

``stage_through_host()`` (TEST ONLY, never entered by the library): ``Comm``s of attention
calls made inside it stage every transfer through fresh host buffers (copy to CPU, the gloo
op on the copies, copy back on ``wait``). That is how P processes share ONE GPU in tests:
NCCL refuses two ranks on one device and gloo moves CUDA tensors only for all_reduce and
broadcast. The same bytes are counted; on CPU tensors it runs the same staging, so its
results are checked bit for bit on CPU. Its copies synchronise with the host, by nature.

Byte accounting (``count_traffic``) uses the bandwidth-optimal per-rank volumes: a p2p send
counts its bytes; an all-gather of ``n`` bytes per rank sends ``(P-1)·n``; a reduce-scatter of
an ``N``-byte buffer sends ``(P-1)/P·N``; an all-reduce of ``N`` bytes sends ``2(P-1)/P·N``;
an all-to-all of an ``N``-byte buffer ``(P-1)/P·N``. Received bytes are counted the same way.
"""

from __future__ import annotations

import contextvars
import socket
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes this rank sent and received, collective calls by kind, and block-steps computed."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    calls: Counter = field(default_factory=Counter)
    # (query shard, key shard) pairs of ranks whose attention this rank computed in the
    # forward, only pairs with a visible (query, key): summed over the ranks, every non-empty
    # pair of the whole attention once, in every method (tests/test_attention_options.py)
    block_steps: int = 0
    parent: Traffic | None = None
    sent_by_kind: Counter = field(default_factory=Counter)  # e.g. "all_to_all": two levels' inner

    def add(self, kind: str, sent: int, recv: int) -> None:
        t = self
        while t is not None:
            t.sent_bytes += int(sent)
            t.recv_bytes += int(recv)
            t.calls[kind] += 1
            t.sent_by_kind[kind] += int(sent)
            t = t.parent

    def add_block_steps(self, n: int = 1) -> None:
        t = self
        while t is not None:
            t.block_steps += n
            t = t.parent


_CURRENT: contextvars.ContextVar[Traffic | None] = contextvars.ContextVar(
    "megatron_seqpar_traffic", default=None
)


@contextmanager
def count_traffic():
    """Count what the ops called inside send and receive (this thread; nests)."""
    traffic = Traffic(parent=_CURRENT.get())
    token = _CURRENT.set(traffic)
    try:
        yield traffic
    finally:
        _CURRENT.reset(token)


def current_traffic() -> Traffic | None:
    return _CURRENT.get()


_STAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("megatron_seqpar_staged",
                                                               default=False)


@contextmanager
def stage_through_host():
    """TEST ONLY: attention calls made inside stage their transfers through host memory over
    the (gloo) group, so several ranks can share one GPU. Never used by the library itself."""
    token = _STAGED.set(True)
    try:
        yield
    finally:
        _STAGED.reset(token)


def staging_enabled() -> bool:
    return _STAGED.get()


def _host(x: torch.Tensor) -> torch.Tensor:
    """A fresh, dense host copy of ``x`` (staging)."""
    with _sync_allowed():
        return torch.empty(x.shape, dtype=x.dtype).copy_(x)


@contextmanager
def _sync_allowed():
    """Staging copies synchronise by nature: keep CUDA's sync debug mode quiet for them only
    (so a test running under ``torch.cuda.set_sync_debug_mode`` sees every other sync)."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


@contextmanager
def failure_hint(kind: str):
    """Re-raise a failed transfer with what to check (a dead peer, a mismatched call)."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(
            f"megatron_seqpar: {kind} on the sequence-parallel group failed ({exc}). A peer "
            "died, or ranks called different ops or shapes, or the group's timeout passed: "
            "check every rank's log for the first error, and that all ranks of the group run "
            "the same method with equally shaped shards"
        ) from exc


class Pending:
    """Transfers in flight; ``wait()`` returns when their results may be used (group timeout
    applies): on CUDA the compute stream is made to wait (device-side), on CPU the host waits;
    staged receives are copied back into the caller's buffers."""

    def __init__(self, works, keep_alive=(), stream=None, copy_back=(),
                 hint="point-to-point transfer"):
        self._works = works
        self._hint = hint  # what a failure names (``failure_hint``)
        self._keep_alive = keep_alive  # send buffers must outlive their transfer
        self._stream = stream  # the side stream the transfers were issued on (CUDA)
        self._copy_back = copy_back  # (host buffer, caller's buffer) pairs (staging)

    def wait(self) -> None:
        with failure_hint(self._hint):
            for w in self._works:
                w.wait()
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        with _sync_allowed():
            for host, buf in self._copy_back:
                buf.copy_(host)
        self._works, self._keep_alive, self._copy_back = [], (), ()


# torch >= 2.13 names; older releases call them all_gather_into_tensor / reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


# NCCL groups on which every rank has run an operation (so their communicator exists): a
# cache of facts about live groups, held weakly (gone with the group), not behaviour
_NCCL_JOINED: weakref.WeakSet = weakref.WeakSet()


def free_port() -> int:
    """A free TCP port on localhost, for a single-node rendezvous (the driver, tools, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comm:
    """Collectives and P2P on one explicit group. ``group=None`` is the default group."""

    def __init__(self, group=None, traffic: Traffic | None = None, staged: bool = False):
        self.group = group
        self.traffic = traffic
        self.staged = staged  # stage_through_host: host copies over gloo (tests only)
        self._stream = None  # CUDA side stream, made on first use
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.nccl = dist.get_backend(group) == "nccl"
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not "
                                 "initialised; call torch.distributed.init_process_group first")
            self.rank, self.world_size, self.nccl = 0, 1, False

    def join_nccl(self, device: torch.device) -> None:
        """Make sure the group's NCCL communicator exists before the first point-to-point
        batch. NCCL creates it at the group's first operation, and a ``batch_isend_irecv``
        that is that first operation must be joined by every rank of the group; but a rank of
        a packed stream or a causal schedule may have nothing to send at a step and skip it.
        So every rank runs one one-element all-reduce on the group first (asynchronous, on the
        current stream: no host sync), once per group. Every rank must call this at the same
        point (``api.prepare`` does, on every call); gloo and single-rank groups need none."""
        if not self.nccl or self.staged or self.world_size == 1:
            return
        group = self.group if self.group is not None else dist.group.WORLD
        if group in _NCCL_JOINED:
            return
        with failure_hint("the first operation of the NCCL group"):
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
        _NCCL_JOINED.add(group)

    def _count(self, kind: str, sent: int, recv: int) -> None:
        if self.traffic is not None:
            self.traffic.add(kind, sent, recv)

    @contextmanager
    def _side_stream(self, tensors):
        """Issue NCCL work on the side stream (after the compute stream's pending writes);
        yields the stream, or None off CUDA/NCCL."""
        if not (self.nccl and not self.staged and tensors and tensors[0].is_cuda):
            yield None
            return
        dev = tensors[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._stream):
            yield self._stream
        for t in tensors:
            t.record_stream(self._stream)

    def _join(self, stream) -> None:
        """After a blocking collective: the compute stream waits on the side stream."""
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)

    def post(self, sends=(), recvs=(), kind: str = "p2p") -> Pending:
        """Start sends ``[(tensor, dst)]`` and receives ``[(tensor, src)]`` (group ranks).

        Sends are made contiguous (a no-op for dense tensors); receive buffers must be.
        ``kind`` names the traffic in ``count_traffic`` and, unless "p2p", a failure.
        """
        sends = [(t.contiguous(), p) for t, p in sends]
        recvs = list(recvs)
        if not sends and not recvs:
            return Pending([])
        self._count(kind, sum(_nbytes(t) for t, _ in sends), sum(_nbytes(t) for t, _ in recvs))
        copy_back = ()
        if self.staged:
            sends = [(_host(t), p) for t, p in sends]
            host = [(torch.empty(t.shape, dtype=t.dtype), p) for t, p in recvs]
            copy_back = [(h, t) for (h, _), (t, _) in zip(host, recvs)]
            recvs = host
        hint = "point-to-point transfer" if kind == "p2p" else kind
        with failure_hint(hint), self._side_stream([t for t, _ in sends + recvs]) as stream:
            works = self._start(sends, recvs)
        return Pending(works, sends, stream, copy_back, hint)

    def _start(self, sends, recvs) -> list:
        """Start point-to-point transfers (group ranks). NCCL: one ``batch_isend_irecv``, whose
        grouping lets the transfers of a step run together. Elsewhere (gloo) the group's own
        ``send``/``recv``: the same transfers in the same order without the batch's Python
        wrapper, which took 40% of a rank's host time per exchange (a send/recv pair of 8 KB on
        2 gloo ranks: 0.20 -> 0.12 ms CPU)."""
        if self.nccl:
            ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=p) for t, p in sends]
            ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=p) for t, p in recvs]
            return dist.batch_isend_irecv(ops)
        pg = self.group if self.group is not None else dist.group.WORLD
        return ([pg.send([t], p, 0) for t, p in sends]
                + [pg.recv([t], p, 0) for t, p in recvs])

    def _exchange(self, sends, recvs) -> None:
        """Blocking batch of p2p transfers (not counted: the caller counts its collective)."""
        for work in self._start(sends, recvs):
            work.wait()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[P, *x.shape]``: every rank's ``x`` in rank order."""
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        out[self.rank].copy_(x)
        return self.all_gather_inplace(out)

    def all_gather_inplace(self, out: torch.Tensor) -> torch.Tensor:
        """All-gather into ``out`` (``[P, *shape]``, contiguous) whose slot ``out[rank]`` already
        holds this rank's data: no separate input buffer. Returns ``out``."""
        self.all_gather_post(out).wait()
        return out

    def all_gather_post(self, out: torch.Tensor) -> Pending:
        """``all_gather_inplace`` started, not finished: ``wait()`` on the result before
        reading ``out`` (and leave this rank's slot unchanged until then). NCCL: one
        asynchronous all-gather in place on the side stream; gloo (which would stage it in a
        P-fold copy): point-to-point transfers straight into ``out``."""
        P, r = self.world_size, self.rank
        if out.size(0) != P or not out.is_contiguous():
            raise ValueError(f"an all-gather needs a contiguous [{P}, ...] buffer")
        if P == 1:
            return Pending([])
        if self.nccl and not self.staged:
            n = _nbytes(out[0]) * (P - 1)
            self._count("all_gather", n, n)
            with failure_hint("all_gather"), self._side_stream([out]) as stream:
                work = _all_gather_single(out.view(-1), out[r].view(-1), group=self.group,
                                          async_op=True)
            return Pending([work], (), stream, hint="all_gather")
        peers = [j for j in range(P) if j != r]
        return self.post([(out[r], j) for j in peers], [(out[j], j) for j in peers],
                         kind="all_gather")

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of ``x[rank]``, where ``x`` is ``[P, *shape]`` (chunk i -> rank i)."""
        P = self.world_size
        if x.size(0) != P:
            raise ValueError(f"reduce_scatter needs a leading dim of {P}")
        x = x.contiguous()
        if P == 1:
            return x[0].clone()
        n = _nbytes(x) * (P - 1) // P
        self._count("reduce_scatter", n, n)
        with failure_hint("reduce_scatter"):
            if self.staged:
                out = self._reduce_scatter_p2p(_host(x))
                with _sync_allowed():
                    return out.to(x.device)
            if self.nccl:
                out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
                with self._side_stream([out, x]) as stream:
                    _reduce_scatter_single(out.view(-1), x.view(-1), group=self.group)
                self._join(stream)
                return out
            return self._reduce_scatter_p2p(x)

    def _reduce_scatter_p2p(self, x: torch.Tensor) -> torch.Tensor:
        """gloo: P-1 pairwise steps, one chunk-sized receive buffer (no P-fold staging)."""
        P, r = self.world_size, self.rank
        out, buf = x[r].clone(), torch.empty_like(x[r])
        for t in range(1, P):
            self._exchange([(x[(r + t) % P], (r + t) % P)], [(buf, (r - t) % P)])
            out.add_(buf)
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """``[P, *shape]`` chunk ``i`` -> rank ``i``; returns ``[P, *shape]`` whose chunk ``j``
        came from rank ``j`` (one ``all_to_all_single``)."""
        P = self.world_size
        if x.size(0) != P:
            raise ValueError(f"all_to_all needs a leading dim of {P}")
        x = x.contiguous()
        if P == 1:
            return x
        n = _nbytes(x) * (P - 1) // P
        self._count("all_to_all", n, n)
        with failure_hint("all_to_all"):
            if self.staged:
                host = _host(x)
                out = torch.empty_like(host)
                dist.all_to_all_single(out, host, group=self.group)
                with _sync_allowed():
                    return out.to(x.device)
            out = torch.empty_like(x)
            with self._side_stream([out, x]) as stream:
                dist.all_to_all_single(out, x, group=self.group)
            self._join(stream)
            return out

    def all_reduce_(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of a contiguous tensor."""
        if self.world_size > 1:
            n = 2 * (self.world_size - 1) * _nbytes(x) // self.world_size
            self._count("all_reduce", n, n)
            with failure_hint("all_reduce"):
                if self.staged:
                    buf = _host(x)
                    dist.all_reduce(buf, op=op, group=self.group)
                    with _sync_allowed():
                        x.copy_(buf)
                    return x
                with self._side_stream([x]) as stream:
                    dist.all_reduce(x, op=op, group=self.group)
                self._join(stream)
        return x
