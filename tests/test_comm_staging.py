"""The test-only staging communicator (``comm.stage_through_host``) and the no-host-sync rule.

On a lent GPU, P processes share one device and every transfer is staged through host memory
over gloo (tools/gpu_check.py). Here the same staging runs on CPU tensors: every transfer goes
through fresh host buffers, and the results must be bit-identical to the unstaged run, with the
same bytes counted.
"""

import ast
import pathlib

import pytest
import torch
from distributed import run_on_ranks

import megatron_seqpar as msp
from megatron_seqpar.comm import Comm, count_traffic, stage_through_host, staging_enabled
from megatron_seqpar.layouts import SEQUENCE_LAYOUTS

PKG = pathlib.Path(msp.__file__).parent


def _run(method, layout, causal, pad, staged, seed=0):
    world = torch.distributed.get_world_size()
    b, s, hq, hkv, d = 2, 8, 4, 2, 8
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, s * world, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    kpm = torch.zeros(b, s * world, dtype=torch.bool)
    kpm[0, -5:] = True
    kpm[1, :3] = True
    shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout)
    mine = [shard(x).requires_grad_() for x in (q, k, v)]
    with count_traffic() as t:
        if staged:
            with stage_through_host():
                out = msp.attention(*mine, method=method, causal=causal, layout=layout,
                                    key_padding_mask=shard(kpm) if pad else None)
        else:
            out = msp.attention(*mine, method=method, causal=causal, layout=layout,
                                key_padding_mask=shard(kpm) if pad else None)
        out.backward(shard(do))  # the backward reuses the forward's (staged) communicator
    return [out.detach()] + [x.grad for x in mine], (t.sent_bytes, t.recv_bytes, dict(t.calls))


def staged_equals_plain(rank, world):
    import megatron_seqpar.comm as comm_mod

    copies = []
    orig = comm_mod._host
    comm_mod._host = lambda x: copies.append(x.numel()) or orig(x)  # count host copies
    bad = []
    try:
        for method in msp.METHODS:
            for layout in SEQUENCE_LAYOUTS:
                for causal, pad in ((True, False), (False, True), (True, True)):
                    plain, tp = _run(method, layout, causal, pad, staged=False)
                    n_plain = len(copies)
                    staged, ts = _run(method, layout, causal, pad, staged=True)
                    n_staged = len(copies) - n_plain
                    copies.clear()
                    same = all(torch.equal(a, b) for a, b in zip(plain, staged))
                    if not same or tp != ts or n_plain or not n_staged:
                        bad.append(f"{method} {layout} causal={causal} pad={pad}: bit-identical "
                                   f"{same}, traffic {tp} vs {ts}, host copies plain "
                                   f"{n_plain} staged {n_staged}")
    finally:
        comm_mod._host = orig
    return bad


@pytest.mark.parametrize("world", [2, 3])
def test_staged_is_bit_identical_with_same_bytes(world):
    bad = [f"rank {r}: {x}" for r, xs in enumerate(run_on_ranks(staged_equals_plain, world))
           for x in xs]
    assert not bad, "\n".join(bad)


def staged_buffers(rank, world):
    """Staged p2p sends host copies and fills the caller's receive buffer only on wait();
    staged collectives leave the caller's buffers untouched until they copy back."""
    peer = (rank + 1) % world
    src = (rank - 1) % world
    comm = Comm(None, staged=True)
    x = torch.full((5,), float(rank))
    recv = torch.full((5,), -1.0)
    pending = comm.post([(x, peer)], [(recv, src)])
    sent_copy = pending._keep_alive[0][0]
    assert sent_copy.data_ptr() != x.data_ptr() and torch.equal(sent_copy, x)
    pending.wait()
    assert torch.equal(recv, torch.full((5,), float(src)))
    buf = torch.zeros(world, 3)
    buf[rank] = rank + 1
    comm.all_gather_inplace(buf)
    assert torch.equal(buf, torch.arange(1, world + 1, dtype=torch.float).repeat(3, 1).T)
    rs = comm.reduce_scatter(torch.ones(world, 2) * (rank + 1))
    assert torch.equal(rs, torch.full((2,), world * (world + 1) / 2))
    ar = comm.all_reduce_(torch.tensor([float(rank)]))
    assert ar.item() == sum(range(world))
    return True


def test_staged_comm_buffers():
    assert all(run_on_ranks(staged_buffers, 2))


def test_staging_is_explicit():
    assert not staging_enabled()
    with stage_through_host():
        assert staging_enabled()
    assert not staging_enabled()
    assert Comm().staged is False


# Host synchronisation: inside an attention call nothing may read a tensor's value on the host.
# A CPU run cannot see a CUDA sync, so the sources of the attention path are checked instead
# (tests/test_fake_cuda.py runs every method on fake CUDA tensors, where a host read raises;
# tools/gpu_check.py runs them under torch.cuda.set_sync_debug_mode on a GPU).
HOST_READS = {"item", "tolist", "cpu", "numpy", "synchronize", "nonzero", "equal"}
ATTENTION_PATH = ("api.py", "common.py", "comm.py", "kernels.py", "kernels_cuda.py",
                  "layouts.py", "rsa.py", "mqsp.py", "lss.py", "lightseq.py", "headpar.py",
                  "hostread.py", "megatron/core_attention.py", "megatron/thd.py",
                  "megatron/checkpointing.py", "megatron/bert.py")
# the only host reads allowed: api's cross-rank shape check (CPU tensors only: skipped for
# CUDA), layouts' gather helper (outside an attention call), and the readers that run through
# hostread.once, once per tensor (per step: every layer passes the same cu_seqlens and mask)
ALLOWED = {("api.py", "_check_across_ranks"), ("layouts.py", "gather_sequence"),
           ("hostread.py", "_ints"), ("hostread.py", "_true_runs"),
           ("megatron/core_attention.py", "_key_padding"),
           # remat's pairing checksum: one float per recomputed layer (recompute on only)
           ("megatron/checkpointing.py", "_fingerprint")}
ONCE_ONLY = {("hostread.py", "_ints"), ("hostread.py", "_true_runs"),
             ("megatron/core_attention.py", "_key_padding"),
             ("megatron/core_attention.py", "_padded_ranges")}


def _host_reads(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in HOST_READS):
                found.append((fn.name, node.func.attr, node.lineno))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("float", "int", "bool") and node.args and \
                    isinstance(node.args[0], (ast.Subscript, ast.Call)):
                found.append((fn.name, node.func.id, node.lineno))  # float(t[0]), int(t.sum())
    return found


def test_no_host_reads_in_the_attention_path():
    bad = [f"{name}:{line} {fn}() calls .{attr}()"
           for name in ATTENTION_PATH
           for fn, attr, line in _host_reads(PKG / name)
           if (name, fn) not in ALLOWED]
    assert not bad, "\n".join(bad)


def test_host_readers_run_only_through_once():
    """The readers allowed above are called nowhere but as ``once(x, key, reader)``'s
    ``fn`` (in a lambda or by name), so a layer never reads what an earlier layer read."""
    for name, fn in ONCE_ONLY:
        tree = ast.parse((PKG / name).read_text())
        once_args = {id(n) for call in ast.walk(tree) if isinstance(call, ast.Call)
                     and getattr(call.func, "id", None) == "once" and len(call.args) == 3
                     for n in ast.walk(call.args[2])}
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == fn]
        assert uses and all(id(n) in once_args for n in uses), f"{name}: {fn} outside once()"


def test_a_step_reads_its_masks_and_boundaries_once(monkeypatch):
    """Megatron passes the same attention_mask / PackedSeqParams to every layer of a step:
    the host reads (``torch.equal``, ``tolist``) happen for the first layer only, every layer
    gets the same key-padding tensor, and an in-place change is seen."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_seqpar.megatron import core_attention, thd

    reads = []
    equal, tolist = torch.equal, torch.Tensor.tolist
    monkeypatch.setattr(torch, "equal", lambda *a: reads.append("equal") or equal(*a))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda x: reads.append("tolist") or tolist(x))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    mask = pad[:, None, None, :] | pad[:, None, :, None]  # [b, 1, sq, sk], padding structure
    kw = dict(sq=8, b=2, cp_rank=0, cp_size=1)
    first = [core_attention.key_padding_from_mask(mask, **kw) for _ in range(4)]
    assert all(x is first[0] for x in first) and reads.count("equal") in (1, 2)
    n = len(reads)
    mask[0, 0, 0, 0] = True  # in place: read again, and now refused (not padding structure)
    with pytest.raises(ValueError, match="key-padding masks"):
        core_attention.key_padding_from_mask(mask, **kw)
    assert len(reads) > n
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    reads.clear()
    for _ in range(4):
        assert thd.packed_attention_args(params, 8, 0, 1) == ((0, 5, 8), None, "contiguous")
    assert reads == ["tolist"]


def _join_nccl_once(rank, world):
    import torch.distributed as dist

    from megatron_seqpar import comm as comm_mod

    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k)
    try:
        group = dist.new_group(list(range(world)))
        for _ in range(3):  # every attention call asks; only the first runs the all-reduce
            c = Comm(group)
            c.nccl = True  # as on an NCCL group (gloo runs the all-reduce here)
            c.join_nccl(torch.device("cpu"))
        gloo = Comm(group)
        gloo.join_nccl(torch.device("cpu"))  # gloo needs none
        return calls, group in comm_mod._NCCL_JOINED
    finally:
        dist.all_reduce = real


def test_an_nccl_group_is_joined_once_before_point_to_point():
    """NCCL: a batch_isend_irecv that is a group's first operation must be joined by all of
    its ranks, and a rank may have nothing to send at some step; so every attention call
    first makes sure the group has run one (tiny) all-reduce, once per group."""
    for calls, joined in run_on_ranks(_join_nccl_once, 2):
        assert calls == [1] and joined
