"""Measure what one call costs on this rank: peak allocation, bytes on the wire, RSS, time.

``with measure(rank, world_size) as m: fn()`` runs ``fn`` under the PyTorch profiler with
memory profiling and reads back

- ``m.peak_bytes``: the highest CPU allocation above what was live at entry (every allocation
  and free of the c10 CPU allocator, so the same yardstick for every method and peer);
- ``m.sent_bytes`` / ``m.recv_bytes``: bytes of every c10d collective and p2p op that ran,
  counted with the convention of ``megatron_seqpar.comm`` (p2p = bytes sent; all-gather of n
  bytes per rank = (P-1)·n; reduce-scatter of N = (P-1)/P·N; all-reduce of N = 2(P-1)/P·N;
  all-to-all of N = bytes that leave the rank). This sees collectives issued by any library
  (DeepSpeed, DTensor functional collectives, ours) because it reads the gloo ops themselves;
- ``m.rss_peak_bytes``: the process's resident high-water mark while inside (``VmHWM``, reset
  on entry through ``/proc/self/clear_refs``; 0 where that is unavailable).

Timing is taken separately (``time_call``), without the profiler.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

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
        elif name.startswith("gloo:"):
            kind = name[5:]
            n = sum(_numel(s) for s in e.shapes()) * _ELEM.get((e.dtypes() or ["float"])[0], 4)
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
    """Peak allocation, bytes sent/received and RSS high-water mark of the enclosed code."""
    m = Measurement()
    _reset_hwm()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True) as prof:
        yield m
    m.rss_peak_bytes = _hwm()
    events = prof.profiler.kineto_results.events()
    m.peak_bytes = _peak(events)
    _traffic(events, rank, world_size, m)


def time_call(fn, *, repeats: int = 3, warmup: int = 1, barrier=None) -> float:
    """Median wall time of ``fn()`` in seconds (``barrier()`` before each run if given)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        if barrier is not None:
            barrier()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
