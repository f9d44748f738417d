"""Side-by-side attention benchmark: our methods against peers measured in the same run.

    python tools/bench_attention.py --seqlens 4096 8192 16384 --out runs/bench

Spawns ``--ranks`` gloo processes with one thread each. For every sequence length and every
variant (ours: rsa, mqsp, lss, lightseq in zigzag / contiguous balanced / contiguous
unbalanced; peers: DeepSpeed-Ulysses, PyTorch ring attention, naive all-gather of K/V; and
no-SP in one process with 1 and 2 threads) it runs forward+backward of causal attention and
records: median time, per-rank peak allocation, bytes sent/received (read from the gloo ops,
see ``tools/measure.py``) and the analytic model's figures (``megatron_seqpar.cost``). It
prints a table of RATIOS against the baselines of the same run ("ideal" = half the 1-thread
single-process time), and writes ``<out>.json`` and ``<out>.png``.

The first call of every variant is the profiled one (memory and bytes); the next ``--repeats``
(default 5) are timed without the profiler, each at its slowest rank: ``time_s`` is their
median and ``spread`` their max/min (the per-call jitter, issue 29). A variant whose
predicted memory exceeds ``--max-gb`` is skipped (RSA keeps ``s x S`` score rows, so it
leaves the table at long lengths).

Packed streams and two levels (ours only; ratios of the same run):

    # 16 documents of varied length summing to S, against the same S unpacked, per method
    python tools/bench_attention.py --seqlens 16384 --packed-docs 16 --peers --out runs/packed
    # U=2 x R=2 against U=1 x R=4 on 4 ranks
    python tools/bench_attention.py --seqlens 16384 --ranks 4 --head-parallel 1 2 --peers

Sliding windows (ours; issue 26):

    # P=4, S=32K, causal window of 4096: each method against the window's ideal
    python tools/bench_attention.py --seqlens 32768 --ranks 4 --window 4096 --out runs/window

``--window L`` runs every method with ``window_size=(L, 0)`` in the contiguous layout (a
causal window makes zigzag pointless: every query sees about L keys) plus LightSeq in zigzag,
and ``window/1proc``: the same windowed attention over the whole sequence in one process with
the package's own kernels (``kernels.attend``), whose time is the ideal: ``x_window`` is the
wall time over ``T1 / min(P, cores)`` (P ranks on fewer cores cannot beat that) and
``cpu/window`` the busiest rank's CPU seconds over ``T1``'s CPU seconds ``/ P`` (the work).
Bytes per rank are compared with the model (``cost.attention_cost`` with the window). The peers
run no window: PyTorch's ring attention takes ``is_causal`` only (no mask), and
DeepSpeed-Ulysses' local attention would need an explicit ``[S, S]`` mask (4 GiB in fp32 at
32K); they are left out with ``--window``.

``--balanced`` (with ``--packed-docs``) adds every method in the ``balanced`` layout on the
same stream; its compare row is against the method's zigzag packed row: time, busiest rank's
predicted FLOPs over the mean (``busiest_pred`` balanced, ``flop_pred`` zigzag), peak memory
and bytes sent, and ``t/pred``: its time over the stream's FLOP-predicted time (the method's
unpacked zigzag time times the busiest rank's predicted FLOPs over the unpacked busiest's).
``--doc-lengths {lognormal,uniform,corpus}`` picks the length distribution.

``--packed-docs N`` adds a packed copy of every variant (``+packed``: N documents, lengths
drawn with ``--packed-seed``, multiples of 2P, through ``cu_seqlens``) and prints its time over
the unpacked one beside the predicted FLOP ratio ``sum(L_i^2)/S^2`` and the busiest rank's
predicted pair ratio. ``--head-parallel U ...`` runs each variant at every U (``/U2``) and
prints time and peak memory over U=1. Bytes of our variants are counted by
``megatron_seqpar.comm.count_traffic`` (exact on sub-groups too) and compared with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import BASELINES  # noqa: E402
from measure import measure, median, run_ranks, time_calls  # noqa: E402

from megatron_seqpar.comm import count_traffic  # noqa: E402
from megatron_seqpar.cost import AttnShape, attention_cost, packed_flop_ratio  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    """One row of the table: ``kind`` is "ours" or a baseline name."""

    label: str
    kind: str
    method: str
    layout: str = "contiguous"
    balance: bool = True
    docs: int = 0  # packed stream of this many documents (0: one sequence)
    head_parallel: int = 1  # U (two levels)
    window: int = 0  # causal sliding window (L, 0) when > 0

    def __post_init__(self):
        if self.kind not in ("ours", "window1") and self.kind not in BASELINES:
            raise ValueError(f"unknown variant kind {self.kind!r}")


def doc_lengths(S: int, n: int, unit: int, seed: int = 0, kind: str = "lognormal") -> list[int]:
    """``n`` document lengths, multiples of ``unit``, summing to ``S``, from weights
    ``kind``: ``lognormal`` (sigma 0.8, so lengths vary ~10x), ``uniform`` (1 to 4), or
    ``corpus`` (the driver's default corpus, Python's help topics, bytes per document in
    order); rounded, the longest absorbs the rounding."""
    rng = random.Random(seed)
    if kind == "corpus":
        from megatron_seqpar.training.data import default_documents

        w = [float(len(d.encode("utf-8"))) for d in default_documents()[:n]]
    elif kind == "uniform":
        w = [rng.uniform(1.0, 4.0) for _ in range(n)]
    else:
        w = [rng.lognormvariate(0.0, 0.8) for _ in range(n)]
    out = [max(1, round(x / sum(w) * S / unit)) * unit for x in w]
    out[out.index(max(out))] += S - sum(out)
    if min(out) <= 0:
        raise ValueError(f"cannot cut S={S} into {n} documents of multiples of {unit}")
    return out


def two_level_variants(base: list[Variant], docs: int, head_parallel: list[int]):
    """Each of our variants at every U and, with ``docs``, packed as well."""
    out = []
    for v in base:
        if v.kind != "ours":
            out.append(v)
            continue
        for U in head_parallel:
            vu = v if U == 1 else Variant(f"{v.label}/U{U}", "ours", v.method, v.layout,
                                          v.balance, head_parallel=U)
            out.append(vu)
            if docs:
                out.append(Variant(f"{vu.label}+packed", "ours", v.method, v.layout, v.balance,
                                   docs=docs, head_parallel=U))
    return out


def default_variants(methods: list[str], peers: list[str]) -> list[Variant]:
    out = []
    for m in methods:
        if m == "lightseq":
            out += [Variant("lightseq/zigzag", "ours", m, "zigzag"),
                    Variant("lightseq/contig", "ours", m, "contiguous"),
                    Variant("lightseq/contig-nobal", "ours", m, "contiguous", balance=False)]
        else:
            out.append(Variant(f"{m}/zigzag", "ours", m, "zigzag"))
    for p in peers:
        if p == "nosp":
            out += [Variant("nosp/1thr", "nosp", "nosp"), Variant("nosp/2thr", "nosp", "nosp")]
        else:
            out.append(Variant(p, p, p, BASELINES[p].layout(True)))
    return out


def window_variants(methods: list[str], L: int) -> list[Variant]:
    """``--window L``: every method contiguous (LightSeq zigzag too) and the one-process
    windowed attention whose time over P is the ideal."""
    out = [Variant(f"{m}/contig+w", "ours", m, "contiguous", window=L) for m in methods]
    if "lightseq" in methods:
        out.append(Variant("lightseq/zigzag+w", "ours", "lightseq", "zigzag", window=L))
    return out + [Variant("window/1proc", "window1", "window1", window=L)]


def window_single(L: int):
    """One process, the whole sequence, our kernels under the window ``(L, 0)``."""
    from megatron_seqpar.kernels import attend, attend_backward
    from megatron_seqpar.layouts import Run

    def fn(q, k, v, do):
        runs = (Run(0, 0, q.size(1)),)
        kw = dict(scale=q.size(-1) ** -0.5, causal=True, window=(L, 0))
        qh, kh, vh, doh = (x.transpose(1, 2) for x in (q, k, v, do))
        out, lse = attend(qh, runs, kh, vh, runs, **kw)
        attend_backward(doh, qh, runs, kh, vh, runs, out, lse, **kw)

    return fn


def shard(x: torch.Tensor, rank: int, world: int, layout: str) -> torch.Tensor:
    """This rank's tokens of ``x`` ``[b, S, ...]`` (dim 1) in ``layout``."""
    if layout == "contiguous":
        return x.chunk(world, dim=1)[rank].contiguous()
    c = x.chunk(2 * world, dim=1)
    return torch.cat([c[rank], c[2 * world - 1 - rank]], dim=1).contiguous()


def kernel_floor(S: int, lengths: list[int], a) -> dict:
    """One process, one thread: CPU seconds of the ``cpu_flash`` block kernel's
    forward+backward (causal, its tiling included) on each document whole against the whole
    stream: the packing ratio the kernel itself reaches, before any sequence parallelism (the
    best of ``max(1, repeats)`` calls each)."""
    from megatron_seqpar.kernels import block_attention, block_attention_backward

    torch.set_num_threads(1)
    kw = dict(scale=a.head_dim ** -0.5, causal=True, backend="cpu_flash")
    dt = DTYPES[a.dtype]

    def cpu_s(n: int) -> float:
        g = torch.Generator().manual_seed(n)
        q, do = (torch.randn(a.batch, a.heads, n, a.head_dim, generator=g, dtype=dt)
                 for _ in range(2))
        k, v = (torch.randn(a.batch, a.kv_heads, n, a.head_dim, generator=g, dtype=dt)
                for _ in range(2))
        best = float("inf")
        for _ in range(max(1, a.repeats)):
            t0 = time.process_time()
            o, lse = block_attention(q, k, v, **kw)
            block_attention_backward(do, q, k, v, o, lse, **kw)
            best = min(best, time.process_time() - t0)
        return best

    full, docs = cpu_s(S), sum(cpu_s(n) for n in lengths)
    pred = packed_flop_ratio(lengths)
    return {"S": S, "stream_cpu_s": full, "docs_cpu_s": docs, "ratio": docs / full,
            "flop_pred": pred, "ratio/pred": docs / full / pred}


def _cu(v: Variant, S: int, P: int, a) -> tuple[int, ...] | None:
    if not v.docs:
        return None
    cu = [0]
    for n in doc_lengths(S, v.docs, 2 * P, a.packed_seed, a.doc_lengths):
        cu.append(cu[-1] + n)
    return tuple(cu)


def _model(v: Variant, S: int, P: int, a) -> dict:
    method = {"ours": v.method, "nosp": "nosp", "window1": "nosp"}.get(v.kind, v.kind)
    Pm = 1 if method == "nosp" else P
    try:
        sh = AttnShape(S=S, P=Pm, b=a.batch, hq=a.heads, hkv=a.kv_heads, D=a.head_dim,
                       dtype=a.dtype, causal=True, layout=v.layout, balance=v.balance,
                       cu_seqlens=_cu(v, S, P, a), head_parallel=v.head_parallel,
                       window=(v.window, 0) if v.window else None)
        c = attention_cost(method, sh)
    except ValueError as e:
        return {"error": str(e)}
    out = {"sent": list(c.sent), "inner_sent": list(c.inner_sent),
           "act_bytes": list(c.act_bytes), "flops": list(c.flops)}
    if sh.cu_seqlens:
        cu = sh.cu_seqlens
        out["flop_ratio"] = packed_flop_ratio([b - a for a, b in zip(cu, cu[1:])])
    return out


def _call(v: Variant, group, S: int, cu=None):
    """(context, fn(q, k, v) -> out) for a variant."""
    import contextlib

    if v.kind == "ours":
        import megatron_seqpar as msp

        kw = {"head_parallel": v.head_parallel}
        if v.method == "lightseq":
            kw["balance"] = v.balance
        opts = msp.method_options(v.method)(**kw)
        window = (v.window, 0) if v.window else None
        fn = lambda q, k, vv: msp.attention(q, k, vv, method=v.method, group=group,
                                            causal=True, layout=v.layout, options=opts,
                                            cu_seqlens=cu, window_size=window)
        return contextlib.nullcontext(), fn
    b = BASELINES[v.kind]
    fn = lambda q, k, vv: b.fn(q, k, vv, group=group, causal=True)
    return b.context(group, seq_len=S, causal=True), fn


def _run_variant(rank, world, v: Variant, S: int, a, full) -> dict:
    """Profiled run + timed repeats of one variant; returns this rank's figures."""
    qf, kf, vf, dof = full
    single = v.kind in ("nosp", "window1")
    if single:
        if rank != 0:
            dist.barrier()
            return {"skipped_rank": True}
        torch.set_num_threads(2 if v.label.endswith("2thr") else 1)
        q, k, vv, do = qf, kf, vf, dof
    elif v.docs:
        import megatron_seqpar as msp

        cu = _cu(v, S, world, a)
        q, k, vv, do = (msp.shard_sequence(x, dim=1, layout=v.layout, cu_seqlens=cu)
                        for x in (qf, kf, vf, dof))
    else:
        q, k, vv, do = (shard(x, rank, world, v.layout) for x in (qf, kf, vf, dof))
    q, k, vv = (x.detach().requires_grad_() for x in (q, k, vv))
    cu = _cu(v, S, world, a) if v.kind == "ours" else None

    def step():
        if v.kind == "window1":
            window_single(v.window)(q, k, vv, do)
            return
        ctx, fn = _call(v, None, S, cu)  # a fresh context each call (they are single-use)
        with ctx:
            out = fn(q, k, vv)
            out.backward(do)
        q.grad = k.grad = vv.grad = None

    res = {}
    barrier = None if single else dist.barrier
    if barrier is not None:
        barrier()
    t0 = time.perf_counter()
    with measure(0 if single else rank, 1 if single else world) as m, count_traffic() as tr:
        step()
    if v.kind == "ours":  # our own count: exact on the two-level sub-groups as well
        res.update(traffic_sent=tr.sent_bytes, traffic_inner=tr.sent_by_kind["all_to_all"])
    res.update(peak_bytes=m.peak_bytes, sent_bytes=m.sent_bytes, recv_bytes=m.recv_bytes,
               rss_peak_bytes=m.rss_peak_bytes, calls=m.calls,
               profiled_time_s=time.perf_counter() - t0)
    c0, usage = time.process_time(), []
    res["times_s"] = (time_calls(step, repeats=a.repeats, warmup=0, barrier=barrier,
                                 usage=usage) if a.repeats else [res["profiled_time_s"]])
    res["call_cpu_s"] = [round(c, 4) for c, _ in usage]  # per call: CPU seconds, page faults
    res["call_faults"] = [f for _, f in usage]
    res["time_s"] = median(res["times_s"])
    # CPU seconds of this process per call (every thread): on a shared machine the wall time
    # follows the other jobs' load, the CPU time far less (barrier waits add a little)
    res["cpu_s"] = (time.process_time() - c0) / max(1, a.repeats)
    if single:
        torch.set_num_threads(1)
        dist.barrier()
    return res


def _worker(rank, world, port, a, variants, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    dtype = DTYPES[a.dtype]
    results = []
    for S in a.seqlens:
        g = torch.Generator().manual_seed(S)
        full = tuple(torch.randn(a.batch, S, h, a.head_dim, generator=g, dtype=dtype)
                     for h in (a.heads, a.kv_heads, a.kv_heads, a.heads))
        for v in variants:
            model = _model(v, S, world, a)
            if "act_bytes" in model and max(model["act_bytes"]) > a.max_gb * 2**30:
                res = {"skipped": f"predicted {max(model['act_bytes']) / 2**30:.1f} GB > "
                                  f"--max-gb {a.max_gb}"}
            else:
                try:
                    res = _run_variant(rank, world, v, S, a, full)
                except Exception as e:  # noqa: BLE001 - a failing peer must not end the run
                    res = {"error": f"{type(e).__name__}: {e}"[:300]}
                    dist.barrier()
            results.append({"S": S, "variant": asdict(v), "rank": rank, "model": model,
                            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", **res})
            if rank == 0:
                print(f"  S={S} {v.label}: " + (f"{res['time_s']:.2f}s" if "time_s" in res
                                               else str(res)[:120]), flush=True)
    queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def collect(rows: list[dict], world: int) -> list[dict]:
    """Merge per-rank rows into one record per (S, variant)."""
    table: dict = {}
    for r in rows:
        key = (r["S"], r["variant"]["label"])
        rec = table.setdefault(key, {"S": r["S"], "label": r["variant"]["label"],
                                     "variant": r["variant"], "model": r["model"],
                                     "ranks": {}})
        rec["ranks"][r["rank"]] = {k: v for k, v in r.items()
                                   if k not in ("S", "variant", "model", "rank")}
    out = []
    for rec in table.values():
        ranks = [rec["ranks"][i] for i in sorted(rec["ranks"]) if "time_s" in rec["ranks"][i]]
        if ranks:
            # each iteration's time is its slowest rank's; the median and the spread (max/min)
            # are over those
            per_call = [max(t) for t in zip(*(x["times_s"] for x in ranks))]
            rec["times_s"] = per_call
            rec["time_s"] = median(per_call)
            rec["spread"] = max(per_call) / min(per_call)
            if all("cpu_s" in x for x in ranks):
                rec["cpu_s"] = max(x["cpu_s"] for x in ranks)
            rec["peak_bytes"] = [x["peak_bytes"] for x in ranks]
            rec["sent_bytes"] = [x["sent_bytes"] for x in ranks]
            rec["recv_bytes"] = [x["recv_bytes"] for x in ranks]
            rec["rss_peak_bytes"] = [x["rss_peak_bytes"] for x in ranks]
            if "traffic_sent" in ranks[0]:
                rec["traffic_sent"] = [x["traffic_sent"] for x in ranks]
                rec["traffic_inner"] = [x["traffic_inner"] for x in ranks]
        else:
            rec["status"] = next(iter(rec["ranks"].values()))
        out.append(rec)
    return out


def ratios(records: list[dict]) -> list[dict]:
    """Time and memory ratios against the baselines measured at the same length."""
    by = {(r["S"], r["label"]): r for r in records}
    rows = []
    for r in records:
        if "time_s" not in r:
            continue
        S = r["S"]
        row = {"S": S, "label": r["label"], "time_s": r["time_s"], "spread": r["spread"],
               "cpu_s": r.get("cpu_s"),
               "peak_mb": max(r["peak_bytes"]) / 2**20,
               "sent_mb": max(r["sent_bytes"]) / 2**20}
        base = by.get((S, "nosp/1thr"))
        if base and "time_s" in base:
            row["x_ideal"] = r["time_s"] / (base["time_s"] / 2)
        win = by.get((S, "window/1proc"))
        if win and "time_s" in win and r["label"] != "window/1proc":
            # wall time against T1 / min(P, cores) (P ranks on fewer cores cannot beat that),
            # and the busiest rank's CPU seconds against T1's / P (the work, whatever the cores)
            P = len(r["peak_bytes"])
            row["x_window"] = r["time_s"] / (win["time_s"] / min(P, os.cpu_count() or P))
            if r.get("cpu_s") and win.get("cpu_s"):
                row["cpu/window"] = r["cpu_s"] / (win["cpu_s"] / P)
        for peer in ("ulysses", "ring", "nosp/1thr"):
            p = by.get((S, peer))
            if p and "time_s" in p:
                if peer != "nosp/1thr":
                    row[f"t/{peer}"] = r["time_s"] / p["time_s"]
                row[f"mem/{peer}"] = max(r["peak_bytes"]) / max(1, max(p["peak_bytes"]))
        m = r["model"]
        sent = r.get("traffic_sent", r["sent_bytes"])
        if "sent" in m and max(m["sent"]):
            row["bytes/model"] = max(sent) / max(m["sent"])
            row["bytes==model"] = sent == m["sent"] if "traffic_sent" in r else ""
        if "traffic_inner" in r and max(m.get("inner_sent", [0])):
            row["inner==model"] = r["traffic_inner"] == m["inner_sent"]
        if "act_bytes" in m:
            row["mem/model"] = max(r["peak_bytes"]) / max(1, max(m["act_bytes"]))
        rows.append(row)
    return rows


def _spread(rec: dict) -> float:
    """The model's busiest rank's attention FLOPs over the mean."""
    flops = rec["model"].get("flops", [0])
    return max(flops) / max(1, sum(flops) / len(flops))


def compare(records: list[dict]) -> list[dict]:
    """Packed rows against the same variant unpacked (balanced ones against the method's
    zigzag packed row); U > 1 rows against U = 1."""
    by = {(r["S"], r["label"]): r for r in records if "time_s" in r}
    rows = []
    for (S, label), r in by.items():
        if label.endswith("/balanced+packed"):
            z = by.get((S, label.replace("/balanced+", "/zigzag+")))
            u = by.get((S, label.replace("/balanced+packed", "/zigzag")))
            if z:
                # t/pred: time over the unpacked call's time times the busiest rank's predicted
                # FLOPs over the unpacked busiest rank's (the stream's FLOP-predicted time)
                pred = (max(r["model"]["flops"]) / max(u["model"]["flops"])
                        if u and r["model"].get("flops") and u["model"].get("flops") else None)
                rows.append({"S": S, "label": label, "vs": "zigzag+packed",
                             "t/pred": r["time_s"] / u["time_s"] / pred if pred else None,
                             "time_ratio": r["time_s"] / z["time_s"],
                             "cpu_ratio": r["cpu_s"] / z["cpu_s"] if "cpu_s" in r and "cpu_s"
                             in z else None, "busiest_pred": _spread(r), "flop_pred": _spread(z),
                             "mem_ratio": max(r["peak_bytes"]) / max(1, max(z["peak_bytes"])),
                             "bytes_ratio": max(r.get("traffic_sent", [0])) /
                             max(1, max(z.get("traffic_sent", [1]))),
                             "bytes==model": r.get("traffic_sent") == r["model"].get("sent")})
            continue
        if label.endswith("+packed") and (S, label[:-7]) in by:
            u = by[(S, label[:-7])]
            pairs = lambda rec: max(rec["model"].get("flops", [0]))
            t = r["time_s"] / u["time_s"]
            pred = r["model"].get("flop_ratio")
            cpu = r["cpu_s"] / u["cpu_s"] if "cpu_s" in r and "cpu_s" in u else None
            rows.append({"S": S, "label": label, "vs": "unpacked", "time_ratio": t,
                         "cpu_ratio": cpu, "cpu/pred": cpu / pred if cpu and pred else None,
                         "flop_pred": pred, "busiest_pred": pairs(r) / max(1, pairs(u)),
                         "t/pred": t / pred if pred else None,
                         "mem_ratio": max(r["peak_bytes"]) / max(1, max(u["peak_bytes"])),
                         "bytes==model": r.get("traffic_sent") == r["model"].get("sent")})
        base = label.split("/U")[0] + ("+packed" if label.endswith("+packed") else "")
        if "/U" in label and (S, base) in by:
            u = by[(S, base)]
            rows.append({"S": S, "label": label, "vs": base, "time_ratio":
                         r["time_s"] / u["time_s"],
                         "cpu_ratio": r["cpu_s"] / u["cpu_s"] if "cpu_s" in r and "cpu_s" in u
                         else None, "mem_ratio":
                         max(r["peak_bytes"]) / max(1, max(u["peak_bytes"])),
                         "bytes==model": r.get("traffic_sent") == r["model"].get("sent")})
    return rows


def print_compare(rows: list[dict]) -> None:
    if not rows:
        return
    cols = ["S", "label", "vs", "time_ratio", "cpu_ratio", "flop_pred", "busiest_pred", "t/pred",
            "cpu/pred", "mem_ratio", "bytes_ratio", "bytes==model"]
    print("\n" + " ".join(f"{c:>22}" if c in ("label", "vs") else f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            w = 22 if c in ("label", "vs") else 12
            cells.append(f"{x:>{w}.3f}" if isinstance(x, float) else f"{x!s:>{w}}")
        print(" ".join(cells))


def print_table(rows: list[dict]) -> None:
    cols = ["S", "label", "time_s", "spread", "cpu_s", "x_ideal", "x_window", "cpu/window",
            "t/ulysses", "t/ring", "peak_mb",
            "mem/ring", "mem/nosp/1thr", "sent_mb", "bytes/model", "bytes==model", "inner==model",
            "mem/model"]
    print(" ".join(f"{c:>24}" if c == "label" else f"{c:>13}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            w = 24 if c == "label" else 13
            cells.append(f"{x:>{w}.3f}" if isinstance(x, float) else f"{x!s:>{w}}")
        print(" ".join(cells))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({r["label"] for r in rows})
    for lab in labels:
        pts = sorted((r["S"], r.get("x_ideal"), r["peak_mb"]) for r in rows if r["label"] == lab)
        xs = [p[0] for p in pts]
        if all(p[1] is not None for p in pts):
            axes[0].plot(xs, [p[1] for p in pts], marker="o", label=lab)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=lab)
    axes[0].set(xscale="log", xlabel="sequence length S", ylabel="time / ideal (T1/P)",
                title="forward+backward time vs ideal")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length S",
                ylabel="peak allocation per rank (MiB)", title="per-rank peak memory")
    axes[0].axhline(1.0, color="gray", lw=0.5)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--methods", nargs="*", default=None,
                   help="ours (default: every method megatron_seqpar.METHODS has)")
    p.add_argument("--peers", nargs="*", default=["nosp", "ulysses", "ring", "allgather"])
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs after the profiled one, each timed at its slowest rank; "
                   "time_s is their median, spread their max/min (0: the profiled run's time)")
    p.add_argument("--max-gb", type=float, default=3.0, help="skip variants predicted above")
    p.add_argument("--packed-docs", type=int, default=0,
                   help="also run each of our variants on a packed stream of N documents")
    p.add_argument("--packed-seed", type=int, default=0)
    p.add_argument("--doc-lengths", choices=("lognormal", "uniform", "corpus"),
                   default="lognormal", help="with --packed-docs: the length distribution")
    p.add_argument("--balanced", action="store_true",
                   help="with --packed-docs: each method also in the balanced layout on the "
                        "same stream, compared with its zigzag packed row")
    p.add_argument("--kernel-floor", action="store_true",
                   help="with --packed-docs: also time the kernel on each document whole vs "
                        "the whole stream (one process, one thread)")
    p.add_argument("--only", nargs="*", default=None,
                   help="keep only these variant labels (e.g. lightseq/zigzag nosp/1thr)")
    p.add_argument("--head-parallel", type=int, nargs="+", default=[1],
                   help="two levels: run our variants at each U (dividing --ranks and heads)")
    p.add_argument("--thp", action="store_true",
                   help="every rank allocates buffers of 2 MiB and more on transparent huge "
                        "pages (PyTorch's THP_MEM_ALLOC_ENABLE=1): large fresh buffers, such "
                        "as RSA's score rows, then cost 512x fewer page faults")
    p.add_argument("--window", type=int, default=0,
                   help="causal sliding window (L, 0): our methods against the one-process "
                        "windowed attention over P (the peers take no window and are left out)")
    p.add_argument("--out", default="runs/bench_attention")
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    if a.methods is None:
        try:
            import megatron_seqpar as msp

            a.methods = list(msp.METHODS)
        except ImportError:
            a.methods = []
    peers = [x for x in a.peers if BASELINES[x].available()]
    for x in set(a.peers) - set(peers):
        print(f"skipping {x}: {BASELINES[x].needs} is not installed")
    bad = [U for U in a.head_parallel if a.ranks % U or a.heads % U]
    if bad:
        p.error(f"--head-parallel {bad} must divide --ranks {a.ranks} and --heads {a.heads}")
    base = window_variants(a.methods, a.window) if a.window else default_variants(a.methods,
                                                                                    peers)
    if a.only is not None:
        base = [v for v in base if v.label in a.only]
    variants = two_level_variants(base, a.packed_docs, a.head_parallel)
    if a.balanced and a.packed_docs:
        ours = [m for m in a.methods if any(v.kind == "ours" and v.method == m for v in base)]
        variants += [Variant(f"{m}/balanced+packed", "ours", m, "balanced", docs=a.packed_docs)
                     for m in ours]
    if a.thp:  # read by each spawned rank's PyTorch at its first allocation
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    rows = run_ranks(_worker, a.ranks, a, variants)
    records = collect(rows, a.ranks)
    table = ratios(records)
    print_table(table)
    print_compare(compare(records))
    floors = []
    if a.kernel_floor and a.packed_docs:
        for S in a.seqlens:
            f = kernel_floor(S, doc_lengths(S, a.packed_docs, 2 * a.ranks, a.packed_seed,
                                            a.doc_lengths), a)
            floors.append(f)
            print(f"kernel floor S={S}: documents whole {f['docs_cpu_s']:.3f} CPU s vs stream "
                  f"{f['stream_cpu_s']:.3f} s: ratio {f['ratio']:.3f}, predicted "
                  f"{f['flop_pred']:.3f} ({f['ratio/pred']:.2f}x)")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "records": records, "ratios": table,
                   "compare": compare(records), "kernel_floor": floors}, f, indent=1)
    plot(table, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    main()
