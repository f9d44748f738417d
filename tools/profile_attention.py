"""Where the time of one attention call goes: torch.profiler per kernel call and collective.

    python tools/profile_attention.py --methods mqsp rsa lightseq --seqlens 8192 --ranks 2
    python tools/profile_attention.py --methods lightseq --seqlens 16384 --packed-docs 16

Spawns ``--ranks`` gloo processes with one thread each (as ``bench_attention``). For every
method and length: one warm-up forward+backward, then ``--calls`` (default 1) each under its own
``torch.profiler``, split into a ``forward`` and a ``backward`` range, with the call's minor
page faults (first touches of fresh memory); ``--option NAME=VALUE`` sets a method option
(e.g. ``--option keep_rows=False`` for RSA). A slow and a fast call of the same code side by
side show where a slow call's time went. Per rank and phase it reports the wall time, then the
self CPU time, call count and mean size of every op class:

- ``kernel``: the fused block kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its
  backward) and ``matmul`` (``bmm``/``mm``: RSA's score rows, or the reference kernel);
- ``comm``: gloo collectives and p2p (``c10d::*``), including the host's wait on them;
- ``copy`` (``copy_``, ``cat``, ``clone``, ``contiguous``, ``to``), ``fill`` (``zeros``,
  ``full``, ``fill_``), ``elementwise`` (``exp``, ``mul``, ``add``, ``sub``, ``logsumexp``, the
  merges, ...), and ``other`` (view bookkeeping, Python).

``--rows N`` prints the N ops with the most self time too. Ratios against LightSeq in the same
run are the figures to read on a shared machine; absolute times move with the load.
Writes ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from measure import run_ranks  # noqa: E402

KERNEL = ("aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
MATMUL = ("aten::bmm", "aten::mm", "aten::matmul", "aten::baddbmm", "aten::addmm")
COPY = ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::to",
        "aten::_to_copy", "aten::stack", "aten::index", "aten::index_put_")
FILL = ("aten::zeros", "aten::full", "aten::fill_", "aten::zero_", "aten::empty",
        "aten::empty_like", "aten::new_empty", "aten::masked_fill_", "aten::masked_fill")


def op_class(name: str) -> str:
    if name in KERNEL:
        return "kernel"
    if name in MATMUL:
        return "matmul"
    if name.startswith(("c10d::", "gloo:", "record_param_comms")) or "wait" in name.lower():
        return "comm"
    if name in COPY:
        return "copy"
    if name in FILL:
        return "fill"
    if name.startswith("aten::") and not any(
            w in name for w in ("view", "slice", "select", "transpose", "reshape", "as_strided",
                                "unsqueeze", "permute", "expand", "detach", "flatten", "alias",
                                "unflatten", "_unsafe_view", "squeeze", "split", "chunk")):
        return "elementwise"
    return "other"


def _phase_ops(prof, phase: str):
    """Self time (us) and count per op name of the events inside the range ``phase``."""
    events = prof.events()
    rng = [e for e in events if e.name == phase]
    if not rng:
        return {}, 0.0
    lo, hi = rng[0].time_range.start, rng[0].time_range.end
    ops: dict = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.name == phase or e.time_range.start < lo or e.time_range.end > hi:
            continue
        ops[e.name][0] += e.self_cpu_time_total
        ops[e.name][1] += 1
    return dict(ops), (hi - lo)


def _summary(ops: dict, wall_us: float) -> dict:
    cls: dict = defaultdict(lambda: [0.0, 0])
    for name, (t, n) in ops.items():
        c = cls[op_class(name)]
        c[0] += t
        c[1] += n
    accounted = sum(t for t, _ in cls.values())
    cls["python/untraced"] = [max(0.0, wall_us - accounted), 0]
    return {k: {"ms": v[0] / 1e3, "calls": v[1], "share": v[0] / max(wall_us, 1)}
            for k, v in sorted(cls.items(), key=lambda kv: -kv[1][0])}


def _one(method, S, a, rank, world):
    import megatron_seqpar as msp

    g = torch.Generator().manual_seed(S)
    full = [torch.randn(a.batch, S, h, a.head_dim, generator=g)
            for h in (a.heads, a.heads, a.heads, a.heads)]
    cu = None
    if a.packed_docs:
        from bench_attention import doc_lengths

        cu = torch.tensor([0, *doc_lengths(S, a.packed_docs, 2 * world)]).cumsum(0)
    q, k, v, do = (msp.shard_sequence(x, dim=1, layout=a.layout, cu_seqlens=cu) for x in full)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    kw = dict(_option(x) for x in a.option)
    if method == "mqsp" and a.micro_q:
        kw["micro_q"] = a.micro_q
    opts = msp.method_options(method)(**kw) if kw else None

    def step():
        from torch.profiler import record_function

        with record_function("forward"):
            out = msp.attention(q, k, v, method=method, causal=True, layout=a.layout,
                                options=opts, cu_seqlens=cu)
        with record_function("backward"):
            out.backward(do)
        q.grad = k.grad = v.grad = None

    step()
    from torch.profiler import ProfilerActivity, profile

    out = []
    for call in range(a.calls):
        dist.barrier()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t0
        res = {"method": method, "S": S, "rank": rank, "call": call, "wall_s": wall,
               "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}
        for phase in ("forward", "backward"):
            ops, us = _phase_ops(prof, phase)
            res[phase] = {"wall_ms": us / 1e3, "classes": _summary(ops, us),
                          "top": sorted(([n, t / 1e3, c] for n, (t, c) in ops.items()),
                                        key=lambda x: -x[1])[:a.rows]}
        out.append(res)
    dist.barrier()
    return out


def _option(text: str):
    """``NAME=VALUE`` of ``--option``: VALUE as a Python literal (True, 4, 1.5) or a string."""
    import ast

    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _worker(rank, world, port, a, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    out = [r for S in a.seqlens for m in a.methods for r in _one(m, S, a, rank, world)]
    queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def report(rows, rows_n: int) -> None:
    by = {(r["S"], r["method"], r["rank"], r["call"]): r for r in rows}
    for S, m, rk, call in sorted(by):
        r = by[(S, m, rk, call)]
        ref = by.get((S, "lightseq", rk, call))
        for phase in ("forward", "backward"):
            p = r[phase]
            rel = (f" ({p['wall_ms'] / ref[phase]['wall_ms']:.2f}x lightseq)"
                   if ref and m != "lightseq" else "")
            print(f"S={S} {m} rank {rk} call {call} {phase}: {p['wall_ms']:.0f} ms{rel}"
                  + (f"; the call faulted {r['faults']} pages" if phase == "forward" else ""))
            for c, v in p["classes"].items():
                print(f"    {c:<16} {v['ms']:9.1f} ms  {v['share']:6.1%}  {v['calls']:6d} calls")
            for name, ms, n in p["top"][:rows_n]:
                print(f"      {name:<58} {ms:9.1f} ms {n:6d}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["mqsp", "rsa", "lightseq"])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--micro-q", type=int, default=None, help="MQSP micro_q (default: its pick)")
    p.add_argument("--packed-docs", type=int, default=0,
                   help="a packed stream of this many documents (bench_attention's lengths)")
    p.add_argument("--calls", type=int, default=1, help="profiled calls, each reported")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option, e.g. keep_rows=False (repeatable)")
    p.add_argument("--rows", type=int, default=8, help="top ops per phase to print")
    p.add_argument("--all-ranks", action="store_true", help="print every rank (default: 0)")
    p.add_argument("--out", default="runs/profile_attention")
    a = p.parse_args(argv)
    import megatron_seqpar as msp

    for m in a.methods:  # a bad --option fails here, before any process starts
        msp.method_options(m)(**dict(_option(x) for x in a.option))
    rows = run_ranks(_worker, a.ranks, a)
    report([r for r in rows if a.all_ranks or r["rank"] == 0], a.rows)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    print(f"wrote {a.out}.json")


if __name__ == "__main__":
    main()
