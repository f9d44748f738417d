"""``megatron_seqpar.hostmem``: the transparent-huge-page hint RSA gives its score rows, and
the pool that keeps them across calls (``rsa.Options.keep_rows``)."""

import sys

import pytest
import torch
from distributed import run_on_ranks
from test_attention_exact import RTOL, run_case

import megatron_seqpar as msp
from megatron_seqpar import hostmem


def thp_mode() -> str | None:
    """The kernel's THP mode (``always``, ``madvise``, ``never``), None without THP."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


THP = sys.platform.startswith("linux") and thp_mode() in ("always", "madvise")


def vm_flags(addr: int) -> set[str]:
    """The ``VmFlags`` of the mapping holding ``addr`` (``hg``: MADV_HUGEPAGE was given)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_small_and_non_cpu_buffers_are_left_alone():
    assert not hostmem.advise_huge_pages(torch.empty(hostmem.MIN_BYTES // 4 - 1))
    assert not hostmem.advise_huge_pages(torch.empty(hostmem.MIN_BYTES, device="meta"))


@pytest.mark.skipif(not THP, reason="needs Linux with transparent huge pages (always/madvise)")
def test_hint_marks_the_buffers_mapping():
    plain = torch.empty(2 * hostmem.MIN_BYTES // 4)
    mid = plain.data_ptr() + hostmem.MIN_BYTES  # a page inside it, away from its edges
    assert "hg" not in vm_flags(mid)  # a fresh mapping is not marked without the hint
    assert hostmem.advise_huge_pages(plain)
    assert "hg" in vm_flags(mid)


def rsa_rows_hinted(rank, world, huge_pages):
    import megatron_seqpar.rsa as rsa

    seen = []
    advise = rsa.advise_huge_pages
    rsa.advise_huge_pages = lambda t: seen.append(advise(t)) or seen[-1]
    rsa.ROWS = hostmem.BufferPool()  # a fresh buffer (the worker may have run RSA before)
    try:
        # the needed causal blocks of the rows b·hq·s·S = 1·2·1536·3072 float64: 39 MiB
        # (rsa.row_elements), just above hostmem.MIN_BYTES (32 MiB)
        errs = run_case("rsa", "zigzag", True, 2, 1, 8, False, torch.float64, seed=5, b=1,
                        S_per_rank=1536, options=msp.method_options("rsa")(huge_pages=huge_pages))
    finally:
        rsa.advise_huge_pages = advise
    return errs, seen


@pytest.mark.parametrize("huge_pages", [True, False], ids=["hinted", "plain"])
def test_rsa_exact_with_and_without_the_hint(huge_pages):
    for errs, seen in run_on_ranks(rsa_rows_hinted, 2, huge_pages):
        assert max(errs) < RTOL, errs
        assert seen == ([THP] if huge_pages else []), seen


def test_rsa_options_reject_non_bools():
    with pytest.raises(ValueError, match="huge_pages must be True or False"):
        msp.method_options("rsa")(huge_pages="yes")
    with pytest.raises(ValueError, match="colossalai_compat must be True or False"):
        msp.method_options("rsa")(colossalai_compat=1)
    with pytest.raises(ValueError, match="keep_rows must be True or False"):
        msp.method_options("rsa")(keep_rows=None)


def test_pool_reuses_a_buffer_only_once_it_is_free():
    pool = hostmem.BufferPool()
    a, fresh = pool.take(1000, torch.float32, "cpu")
    assert fresh
    b, fresh = pool.take(1000, torch.float32, "cpu")  # a is still alive: a second buffer
    assert fresh and b.data_ptr() != a.data_ptr()
    ptr = a.data_ptr()
    del a
    c, fresh = pool.take(1000, torch.float32, "cpu")
    assert not fresh and c.data_ptr() == ptr
    d, fresh = pool.take(1000, torch.float64, "cpu")  # another dtype: its own buffer
    assert fresh and pool.nbytes() == 2 * 4000 + 8000
    del b, c, d
    for _ in range(8):  # the shapes changed: the free buffers of the old ones are dropped
        pool.take(10, torch.float32, "cpu")
    assert pool.nbytes() == 40
    held, _ = pool.take(10, torch.float32, "cpu")
    pool.take(10, torch.float32, "cpu")  # free again at once: released below
    assert hostmem.release_kept() >= 40 and pool.nbytes() == 40  # the one in use stays
    del held


def rsa_live_graphs(rank, world_size):
    """Two RSA calls alive at once (two layers, or two micro-batches before their backward)
    take two buffers; their gradients equal those without the pool; once both graphs are
    gone a third call reuses a buffer. A second backward through a retained graph raises
    autograd's in-place error with or without the pool (RSA's backward writes dS over its
    rows), never a silent wrong gradient."""
    import torch.distributed as dist

    from megatron_seqpar import rsa

    rsa.ROWS = hostmem.BufferPool()
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g, requires_grad=True) for _ in range(3))

    def call(scale, keep):
        return msp.attention(q * scale, k, v, method="rsa", group=dist.group.WORLD,
                             layout="zigzag", causal=True,
                             options=rsa.Options(keep_rows=keep))

    def grads(outs):
        for x in (q, k, v):
            x.grad = None
        sum(o.sum() for o in outs).backward()
        return [x.grad.clone() for x in (q, k, v)]

    want = grads([call(1.0, False), call(2.0, False)])
    outs = [call(1.0, True), call(2.0, True)]
    held = len(rsa.ROWS._entries)
    got = grads(outs)
    del outs
    call(3.0, True)
    err = max(float((a - b).abs().max()) for a, b in zip(want, got))
    raised = []
    for keep in (False, True):
        out = call(1.0, keep)
        out.sum().backward(retain_graph=True)
        try:
            out.sum().backward()
            raised.append(False)
        except RuntimeError as e:
            raised.append("modified by an inplace operation" in str(e))
    return err, held, len(rsa.ROWS._entries), raised


def test_rsa_kept_rows_with_live_graphs():
    for err, held, after, raised in run_on_ranks(rsa_live_graphs, 2):
        # the same float32 operations on the same inputs: bit-identical gradients
        assert err == 0.0 and held == 2 and after == 2, (err, held, after)
        assert raised == [True, True], raised
