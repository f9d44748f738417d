"""``megatron_seqpar.hostmem``: the transparent-huge-page hint RSA gives its score rows."""

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
