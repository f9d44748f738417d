"""Bad input gets a ValueError naming the fix; a dead peer gets an error, never a hang."""

import multiprocessing
import os
import time
from datetime import timedelta

import pytest
import torch
from distributed import run_on_ranks

import megatron_seqpar as msp
from megatron_seqpar.comm import free_port


def qkv(b=1, s=8, hq=4, hkv=2, d=8, dtype=torch.float32):
    return (torch.randn(b, s, hq, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype),
            torch.randn(b, s, hkv, d, dtype=dtype))


@pytest.mark.parametrize("change, match", [
    (dict(method="ring"), "unknown sequence-parallel method"),
    (dict(layout="striped"), "unknown layout"),
    (dict(q=torch.randn(1, 8, 3, 8)), "not divisible by kv heads"),
    (dict(k=torch.randn(1, 6, 2, 8), v=torch.randn(1, 6, 2, 8)), "local lengths differ"),
    (dict(v=torch.randn(1, 8, 1, 8)), "k and v differ in batch, length or heads"),
    (dict(q=torch.randn(1, 8, 4, 8, dtype=torch.float64)), "dtypes differ"),
    (dict(k=torch.randn(1, 8, 2, 8, device="meta"), v=torch.randn(1, 8, 2, 8, device="meta")),
     "devices differ"),
    (dict(q=torch.randn(8, 4, 8)), "4-d tensor"),
    (dict(key_padding_mask=torch.zeros(1, 8)), "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.zeros(1, 7, dtype=torch.bool)), "key_padding_mask must be"),
    (dict(options=msp.method_options("rsa")()), "options for 'lightseq' must be"),
    (dict(key_padding_ranges=((),)), "pass both or neither"),
    (dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool), key_padding_ranges=((), ())),
     "one tuple of"),
    (dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool), key_padding_ranges=(((4, 9),),)),
     "0 <= lo < hi <= 8"),
    (dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool), key_padding_ranges=((1, 2),)),
     "tuple of \\(lo, hi\\) int"),
])
def test_bad_input_single_process(change, match):
    q, k, v = qkv()
    kw = dict(q=q, k=k, v=v, method="lightseq")
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        msp.attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


@pytest.mark.parametrize("make, match", [
    (lambda: msp.method_options("lightseq")(backend="triton"), "unknown kernel backend"),
    (lambda: msp.method_options("mqsp")(micro_q=0), "micro_q must be a positive"),
    (lambda: msp.method_options("rsa")(backend="cpu_flash"), "rsa runs no block kernel"),
    (lambda: msp.method_options("mqsp")(memory_budget_mb=-1), "memory_budget_mb"),
    (lambda: msp.method_options("nope"), "unknown sequence-parallel method"),
    (lambda: msp.shard_sequence(torch.zeros(1, 10), layout="zigzag"), None),
])
def test_bad_options(make, match):
    if match is None:  # one rank, zigzag of 10 tokens: 2 chunks of 5, fine
        make()
        return
    with pytest.raises(ValueError, match=match):
        make()


def test_mqsp_micro_q_must_divide_local_length():
    q, k, v = qkv(s=8)
    with pytest.raises(ValueError, match="does not divide the local length"):
        msp.attention(q, k, v, method="mqsp", options=msp.method_options("mqsp")(micro_q=3))


def _expect_value_error(fn, match):
    try:
        fn()
    except ValueError as exc:
        assert match in str(exc), str(exc)
        return str(exc)
    raise AssertionError(f"no ValueError (wanted {match!r})")


def distributed_errors(rank, world):
    msgs = []
    q, k, v = qkv(s=6 + 2 * rank)  # local lengths differ across ranks
    msgs.append(_expect_value_error(lambda: msp.attention(q, k, v, method="lss"),
                                    "disagree on local seq length"))
    q, k, v = qkv(s=5)
    msgs.append(_expect_value_error(
        lambda: msp.attention(q, k, v, method="rsa", layout="zigzag"), "even local length"))
    msgs.append(_expect_value_error(
        lambda: msp.shard_sequence(torch.zeros(1, 10), layout="zigzag"), "not divisible by 4"))
    q, k, v = qkv()
    causal = rank == 0  # settings differ across ranks
    msgs.append(_expect_value_error(
        lambda: msp.attention(q, k, v, method="mqsp", causal=causal), "disagree on causal"))
    out = msp.attention(q, k, v, method="lightseq")  # the group still works afterwards
    return msgs, tuple(out.shape)


def test_distributed_bad_input_raises_on_every_rank():
    for msgs, shape in run_on_ranks(distributed_errors, 2):
        assert len(msgs) == 4 and shape == (1, 8, 4, 8)


def _dead_peer_child(rank, port, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=20))
    if rank == 1:
        os._exit(0)  # dies without a word
    time.sleep(0.5)
    q, k, v = qkv()
    start = time.monotonic()
    try:
        msp.attention(q, k, v, method="lightseq")
        result.put(("no error", time.monotonic() - start))
    except RuntimeError as exc:
        result.put((str(exc), time.monotonic() - start))


@pytest.mark.own_world
def test_dead_peer_raises_instead_of_hanging():
    ctx = multiprocessing.get_context("spawn")
    result, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dead_peer_child, args=(r, port, result), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        msg, elapsed = result.get(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert "megatron_seqpar" in msg and "A peer died" in msg, msg
    assert elapsed < 60, elapsed
