"""Per-rank peak memory of a block of code: what the memory tests and benchmarks measure.

CUDA: the caching allocator's peak above the allocation at entry. CPU: PyTorch's profiler
records every allocation and free with a timestamp; the peak of their running sum is the
most the block held at once (tensors only, not the Python heap). The CPU profiler costs a few
seconds to start: use it around a step, never inside a training loop. Buffers kept across
calls (RSA's score rows on CPU, ``hostmem.BufferPool``) are released first, so the block
allocates, and the peak counts, what it keeps.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_seqpar.hostmem import release_kept


@dataclass
class PeakMemory:
    peak_bytes: int = 0


def _cpu_allocations(prof):
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


@contextmanager
def track_peak_memory(device: torch.device | str = "cpu"):
    """``with track_peak_memory(dev) as m: ...``; then ``m.peak_bytes``."""
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        return
    from torch.profiler import ProfilerActivity, profile

    release_kept()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    cur = peak = 0
    for _, size in _cpu_allocations(prof):
        cur += size
        peak = max(peak, cur)
    result.peak_bytes = peak
