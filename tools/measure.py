"""Measure what one call costs on this rank: peak allocation, bytes on the wire, RSS, time.

``with measure(rank, world_size) as m: fn()`` runs ``fn`` under the PyTorch profiler with
memory profiling and reads back

- ``m.peak_bytes``: the highest CPU allocation above what was live at entry (every allocation
  and free of the c10 CPU allocator, so the same yardstick for every method and peer);
- ``m.sent_bytes`` / ``m.recv_bytes``: bytes of every c10d collective and p2p op that ran,
  counted with the convention of ``megatron_seqpar.comm`` (p2p = bytes sent; all-gather of n
  bytes per rank = (P-1)·n; reduce-scatter of N = (P-1)/P·N; all-reduce of N = 2(P-1)/P·N
  (a coalesced all-reduce, as Megatron DDP issues, counts N = all its tensors);
  all-to-all of N = bytes that leave the rank). This sees collectives issued by any library
  (DeepSpeed, DTensor functional collectives, ours) because it reads the gloo ops themselves;
- ``m.rss_peak_bytes``: the process's resident high-water mark while inside (``VmHWM``, reset
  on entry through ``/proc/self/clear_refs``; 0 where that is unavailable).

The profiler does not say which process group an op ran on, so ``measure`` applies the ring
factors of a group of ``world_size`` ranks to every op. Where collectives also run on smaller
groups (Megatron: TP, CP, DP groups; a group of one still issues its gloo op), use
``count_comm()``: a dispatch mode that sees each c10d op with its process group and counts the
same convention with that group's size (a group of one moves nothing). It adds Python overhead
to every op, so run it on a separate call, not the profiled or timed one.

Timing is taken separately (``time_call``), without the profiler.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_seqpar import hostmem
from megatron_seqpar.comm import free_port  # noqa: F401  (the tools import it from here)

_ELEM = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
         "unsigned char": 1, "bool": 1, "signed char": 1, "short int": 2}


@dataclass
class Measurement:
    peak_bytes: int = 0
    sent_bytes: int = 0
    recv_bytes: int = 0
    rss_peak_bytes: int = 0
    calls: dict = field(default_factory=dict)


def _hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _traffic(events, rank: int, world: int, m: Measurement) -> None:
    """Bytes from the c10d/gloo op events; gloo events give tensor sizes for list-typed ops."""
    pending: dict[str, list] = {"all_to_all": [], "all_reduce": []}
    for e in sorted(events, key=lambda e: e.start_ns()):
        name = e.name()
        if name.startswith("c10d::"):
            op = name[6:]
            m.calls[op] = m.calls.get(op, 0) + 1
            if op == "alltoall_base_":
                shapes, ci = e.shapes(), e.concrete_inputs()
                n = _numel(shapes[1]) * _ELEM.get(e.dtypes()[1], 4)
                splits = ci[4] if ci and isinstance(ci[4], list) else []
                own = (n * splits[rank] // max(1, sum(splits))) if splits else n // world
                m.sent_bytes += n - own
                out_n = _numel(shapes[0]) * _ELEM.get(e.dtypes()[0], 4)
                osplits = ci[3] if ci and isinstance(ci[3], list) else []
                own_r = (out_n * osplits[rank] // max(1, sum(osplits))) if osplits \
                    else out_n // world
                m.recv_bytes += out_n - own_r
            elif op == "_allgather_base_" or op == "allgather_into_tensor_coalesced":
                n = _numel(e.shapes()[1]) * _ELEM.get(e.dtypes()[1], 4)
                m.sent_bytes += (world - 1) * n
                m.recv_bytes += (world - 1) * n
            elif op == "_reduce_scatter_base_" or op == "reduce_scatter_tensor_coalesced":
                n = _numel(e.shapes()[1]) * _ELEM.get(e.dtypes()[1], 4)
                m.sent_bytes += (world - 1) * n // world
                m.recv_bytes += (world - 1) * n // world
            elif op in ("allreduce_", "allgather_", "send", "recv_", "alltoall_",
                        "reduce_scatter_"):
                pending.setdefault(op, []).append(e)
            elif op == "allreduce_coalesced_":  # one gloo:all_reduce event lists every tensor
                pending.setdefault("allreduce_", []).append(e)  # (Megatron DDP's buckets)
        elif name.startswith("gloo:"):
            kind = name[5:]
            dts = e.dtypes() or ["float"]
            n = sum(_numel(s) * _ELEM.get(dts[min(i, len(dts) - 1)], 4)
                    for i, s in enumerate(e.shapes()))
            if kind == "send":
                m.sent_bytes += n
            elif kind == "recv":
                m.recv_bytes += n
            elif kind == "all_gather" and pending.get("allgather_"):
                pending["allgather_"].pop(0)
                m.sent_bytes += (world - 1) * n
                m.recv_bytes += (world - 1) * n
            elif kind == "all_reduce":
                if pending.get("allreduce_"):
                    pending["allreduce_"].pop(0)
                    m.sent_bytes += 2 * (world - 1) * n // world
                    m.recv_bytes += 2 * (world - 1) * n // world
            elif kind == "all_to_all" and pending.get("alltoall_"):
                pending["alltoall_"].pop(0)
                m.sent_bytes += (world - 1) * n // world
                m.recv_bytes += (world - 1) * n // world


def _peak(events) -> int:
    cur = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


@contextmanager
def measure(rank: int = 0, world_size: int = 1):
    """Peak allocation, bytes sent/received and RSS high-water mark of the enclosed code.
    Buffers kept across calls (RSA's score rows, ``hostmem.BufferPool``) are released first,
    so the code allocates, and the peak counts, what it keeps."""
    m = Measurement()
    hostmem.release_kept()
    _reset_hwm()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True) as prof:
        yield m
    m.rss_peak_bytes = _hwm()
    events = prof.profiler.kineto_results.events()
    m.peak_bytes = _peak(events)
    _traffic(events, rank, world_size, m)


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_bytes(t) for t in x)


class count_comm(TorchDispatchMode):  # noqa: N801 - used like a function: with count_comm()
    """``with count_comm() as c: fn()``: bytes of every c10d op, with its own group's size.

    ``c.sent_bytes``, ``c.recv_bytes``, ``c.calls`` ({op: n}) and ``c.by_group``
    ({group size: sent bytes}); the convention of ``measure`` (p2p = bytes sent; all-gather
    of n bytes per rank = (P-1)·n; reduce-scatter of N = (P-1)/P·N; all-reduce of N, coalesced
    or not, = 2(P-1)/P·N; all-to-all = bytes that leave / arrive), P = the op's group size.
    Broadcasts and barriers are counted as calls only, as in ``measure``.
    """

    def __init__(self):
        super().__init__()
        self.sent_bytes = self.recv_bytes = 0
        self.calls: dict = {}
        self.by_group: dict = {}

    def _add(self, p: int, sent: int, recv: int) -> None:
        self.sent_bytes += sent
        self.recv_bytes += recv
        self.by_group[p] = self.by_group.get(p, 0) + sent

    def _count(self, op: str, args) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        pg = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
        if pg is None:
            return
        group = dist.ProcessGroup.unbox(pg)
        p, r = group.size(), group.rank()
        if op in ("allreduce_", "allreduce_coalesced_"):
            n = 2 * (p - 1) * _bytes(args[0]) // p
            self._add(p, n, n)
        elif op in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_"):
            n = (p - 1) * _bytes(args[1])
            self._add(p, n, n)
        elif op in ("_reduce_scatter_base_", "reduce_scatter_",
                    "reduce_scatter_tensor_coalesced_"):
            n = (p - 1) * _bytes(args[1]) // p
            self._add(p, n, n)
        elif op == "alltoall_base_":
            out, inp, _, osplit, isplit = args[:5]
            own_in = _bytes(inp) * isplit[r] // max(1, sum(isplit)) if isplit \
                else _bytes(inp) // p
            own_out = _bytes(out) * osplit[r] // max(1, sum(osplit)) if osplit \
                else _bytes(out) // p
            self._add(p, _bytes(inp) - own_in, _bytes(out) - own_out)
        elif op == "alltoall_":
            outs, ins = args[0], args[1]
            self._add(p, _bytes(ins) - _bytes(ins[r]), _bytes(outs) - _bytes(outs[r]))
        elif op == "send":
            self._add(p, _bytes(args[0]), 0)
        elif op in ("recv_", "recv_any_source_"):
            self._add(p, 0, _bytes(args[0]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self._count(func._schema.name.split("::")[-1], args)
        return func(*args, **(kwargs or {}))


# How the tools start their rank processes: fresh interpreters ("spawn"), what a user's run
# gets. The test suite forks them from its fork server instead ("forkserver", which imported
# torch and megatron-core once: tests/pool_preload.py), except where a test needs a rank to
# read its environment at start-up (THP).
START_METHOD = "spawn"


def rank_context():
    """The multiprocessing context every tool starts its rank processes with."""
    import torch.multiprocessing as mp

    return mp.get_context(START_METHOD)


def run_ranks(worker, ranks: int, *args) -> list:
    """Spawn ``ranks`` processes running ``worker(rank, ranks, port, *args, queue)``, each of
    which puts a list of rows on ``queue``; returns every rank's rows (in arrival order).
    A process that dies before putting its rows raises ``RuntimeError`` here (never a hang);
    the others are terminated."""
    import queue as queue_mod

    ctx = rank_context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, ranks, port, *args, queue))
             for r in range(ranks)]
    for pr in procs:
        pr.start()
    rows, got = [], 0
    try:
        while got < len(procs):
            try:
                rows += queue.get(timeout=1.0)
                got += 1
            except queue_mod.Empty:
                dead = [r for r, pr in enumerate(procs) if pr.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} of {ranks} exited with code "
                                       f"{procs[dead[0]].exitcode} before reporting; its "
                                       "traceback is above") from None
    finally:
        for pr in procs:
            if got < len(procs) and pr.is_alive():
                pr.terminate()
            pr.join()
    return rows


def time_calls(fn, *, repeats: int = 3, warmup: int = 1, barrier=None,
               usage: list | None = None) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()`` in seconds, in call order
    (``barrier()`` before and after each run if given, so a rank's time includes waiting for
    the slowest one). ``usage``, if given, gets one ``(cpu_s, minor_faults)`` per call: this
    process's CPU seconds (every thread) and first-touch page faults during the call, which
    tell a slow call that computed more or faulted fresh memory in from one that waited."""
    import resource

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        t0 = time.perf_counter()
        fn()
        if usage is not None:  # this rank's own work, before waiting for the others
            usage.append((time.process_time() - c0,
                          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0))
        if barrier is not None:
            barrier()
        times.append(time.perf_counter() - t0)
    return times


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def time_call(fn, *, repeats: int = 3, warmup: int = 1, barrier=None) -> float:
    """Median wall time of ``fn()`` in seconds (``barrier()`` before each run if given)."""
    return median(time_calls(fn, repeats=repeats, warmup=warmup, barrier=barrier))
