"""Host memory for RSA's score rows: a huge-page hint, and buffers kept across calls.

A CPU buffer of 32 MiB or more is a fresh ``mmap`` of glibc's (the largest threshold it
uses), handed back to the system when freed, so every call pays first-touch page faults for
it: 4 KiB at a time, each one zeroed by the kernel. ``advise_huge_pages`` asks Linux for
transparent huge pages on the buffer (``madvise(MADV_HUGEPAGE)``, what PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` does for every allocation): 2 MiB per fault instead. Measured here
(2-core EPYC, THP in ``madvise`` mode): writing 296 MiB of fresh memory took 117 ms with 4 KiB
pages, 32-65 ms with the hint, 16 ms in memory already touched; RSA at P=4, S=8K went from
142K to 6-18K minor faults per call.

The hint changes no contents; it only makes a touched 2 MiB range resident whole, so the
resident size of a buffer written sparsely can grow up to its allocated size. A no-op (returns
False) off Linux, for non-CPU tensors, below ``MIN_BYTES``, and where the kernel refuses it
(THP compiled out or ``never``).

``BufferPool`` keeps such buffers across calls instead (RSA's ``keep_rows``, on by default):
a flat buffer goes back to the pool when the tensor handed out from it dies, i.e. when the
autograd graph that saved it lets go of it (its backward ran without ``retain_graph``, or the
graph was dropped); until then it is never handed out again, so no call writes rows that a
live graph still holds. (RSA's backward overwrites its rows, so a second backward through a
retained graph raises autograd's in-place error, with or without the pool.) With the
huge-page hint every call alternated between fast calls that got 2 MiB pages and slow ones
that paid for them; a kept buffer is faulted in once.
What it costs: the buffers of the last step stay resident between steps (one per layer: no
more than the step's own peak, which holds every layer's rows until its backward).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import weakref

import torch

MADV_HUGEPAGE = 14  # <linux/mman.h>
MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller blocks may share heap pages


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back ``t``'s whole pages with transparent huge pages; True if it
    accepted. Call it before the first write (pages already touched stay 4 KiB)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < MIN_BYTES or not sys.platform.startswith("linux"):
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    lo = -(-t.data_ptr() // page) * page  # madvise wants a page-aligned start
    hi = (t.data_ptr() + nbytes) // page * page
    return madvise(lo, hi - lo, MADV_HUGEPAGE) == 0


_POOLS = weakref.WeakSet()  # every pool, for release_kept


def release_kept() -> int:
    """Drop the free buffers of every pool; returns the bytes released. A measurement calls it
    first, so that the measured call allocates (and counts) the buffers it keeps."""
    return sum(pool.clear() for pool in list(_POOLS))


class BufferPool:
    """Flat buffers kept across calls, handed out again only when free (see the module
    docstring). ``take(n, dtype, device)`` gives a 1-d tensor of ``n`` elements (contents
    undefined) and ``fresh`` = whether it was newly allocated (then not yet touched). A free
    buffer that no take has asked for over twice the pool's size in takes is dropped (the
    shapes changed), so the pool holds only what recent calls use."""

    def __init__(self):
        self._entries = []  # [buffer, weakref to the tensor handed out (or None), last take]
        self._tick = 0
        _POOLS.add(self)

    @staticmethod
    def _free(entry) -> bool:
        return entry[1] is None or entry[1]() is None

    def clear(self) -> int:
        """Drop the free buffers (those in use stay); returns the bytes dropped."""
        kept, dropped = [], []
        for e in self._entries:
            (dropped if self._free(e) else kept).append(e)
        self._entries = kept
        return sum(b.numel() * b.element_size() for b, _, _ in dropped)

    def take(self, n: int, dtype, device) -> tuple[torch.Tensor, bool]:
        self._tick += 1
        device = torch.device(device)
        found = next((e for e in self._entries if self._free(e) and e[0].numel() == n
                      and e[0].dtype == dtype and e[0].device == device), None)
        stale = self._tick - 2 * max(len(self._entries), 1)
        self._entries = [e for e in self._entries
                         if e is found or e[2] >= stale or not self._free(e)]
        fresh = found is None
        if fresh:
            found = [torch.empty(n, dtype=dtype, device=device), None, 0]
            self._entries.append(found)
        out = found[0].view(-1)  # a tensor of its own: its death frees the buffer
        found[1], found[2] = weakref.ref(out), self._tick
        return out, fresh

    def nbytes(self) -> int:
        """Bytes the pool holds (free and in use)."""
        return sum(b.numel() * b.element_size() for b, _, _ in self._entries)
