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
are timed without the profiler. A variant whose predicted memory exceeds ``--max-gb`` is
skipped (RSA keeps ``s x S`` score rows, so it leaves the table at long lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import BASELINES  # noqa: E402
from measure import free_port, measure, time_call  # noqa: E402

from megatron_seqpar.cost import AttnShape, attention_cost  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    """One row of the table: ``kind`` is "ours" or a baseline name."""

    label: str
    kind: str
    method: str
    layout: str = "contiguous"
    balance: bool = True

    def __post_init__(self):
        if self.kind != "ours" and self.kind not in BASELINES:
            raise ValueError(f"unknown variant kind {self.kind!r}")


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


def shard(x: torch.Tensor, rank: int, world: int, layout: str) -> torch.Tensor:
    """This rank's tokens of ``x`` ``[b, S, ...]`` (dim 1) in ``layout``."""
    if layout == "contiguous":
        return x.chunk(world, dim=1)[rank].contiguous()
    c = x.chunk(2 * world, dim=1)
    return torch.cat([c[rank], c[2 * world - 1 - rank]], dim=1).contiguous()


def _model(v: Variant, S: int, P: int, a) -> dict:
    method = {"ours": v.method, "nosp": "nosp"}.get(v.kind, v.kind)
    Pm = 1 if method == "nosp" else P
    try:
        sh = AttnShape(S=S, P=Pm, b=a.batch, hq=a.heads, hkv=a.kv_heads, D=a.head_dim,
                       dtype=a.dtype, causal=True, layout=v.layout, balance=v.balance)
        c = attention_cost(method, sh)
    except ValueError as e:
        return {"error": str(e)}
    return {"sent": list(c.sent), "act_bytes": list(c.act_bytes), "flops": list(c.flops)}


def _call(v: Variant, group, S: int):
    """(context, fn(q, k, v) -> out) for a variant."""
    import contextlib

    if v.kind == "ours":
        import megatron_seqpar as msp

        opts = None
        if v.method == "lightseq" and not v.balance:
            opts = msp.method_options("lightseq")(balance=False)
        fn = lambda q, k, vv: msp.attention(q, k, vv, method=v.method, group=group,  # noqa: E731
                                            causal=True, layout=v.layout, options=opts)
        return contextlib.nullcontext(), fn
    b = BASELINES[v.kind]
    fn = lambda q, k, vv: b.fn(q, k, vv, group=group, causal=True)  # noqa: E731
    return b.context(group, seq_len=S, causal=True), fn


def _run_variant(rank, world, v: Variant, S: int, a, full) -> dict:
    """Profiled run + timed repeats of one variant; returns this rank's figures."""
    qf, kf, vf, dof = full
    single = v.kind == "nosp"
    if single:
        if rank != 0:
            dist.barrier()
            return {"skipped_rank": True}
        torch.set_num_threads(2 if v.label.endswith("2thr") else 1)
        q, k, vv, do = qf, kf, vf, dof
    else:
        q, k, vv, do = (shard(x, rank, world, v.layout) for x in (qf, kf, vf, dof))
    q, k, vv = (x.detach().requires_grad_() for x in (q, k, vv))
    def step():
        ctx, fn = _call(v, None, S)  # a fresh context each call (they are single-use)
        with ctx:
            out = fn(q, k, vv)
            out.backward(do)
        q.grad = k.grad = vv.grad = None

    res = {}
    barrier = None if single else dist.barrier
    if barrier is not None:
        barrier()
    t0 = time.perf_counter()
    with measure(0 if single else rank, 1 if single else world) as m:
        step()
    res.update(peak_bytes=m.peak_bytes, sent_bytes=m.sent_bytes, recv_bytes=m.recv_bytes,
               rss_peak_bytes=m.rss_peak_bytes, calls=m.calls,
               profiled_time_s=time.perf_counter() - t0)
    res["time_s"] = (time_call(step, repeats=a.repeats, warmup=0, barrier=barrier)
                     if a.repeats else res["profiled_time_s"])
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
            results.append({"S": S, "variant": asdict(v), "rank": rank, "model": model, **res})
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
            rec["time_s"] = max(x["time_s"] for x in ranks)
            rec["peak_bytes"] = [x["peak_bytes"] for x in ranks]
            rec["sent_bytes"] = [x["sent_bytes"] for x in ranks]
            rec["recv_bytes"] = [x["recv_bytes"] for x in ranks]
            rec["rss_peak_bytes"] = [x["rss_peak_bytes"] for x in ranks]
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
        row = {"S": S, "label": r["label"], "time_s": r["time_s"],
               "peak_mb": max(r["peak_bytes"]) / 2**20,
               "sent_mb": max(r["sent_bytes"]) / 2**20}
        base = by.get((S, "nosp/1thr"))
        if base and "time_s" in base:
            row["x_ideal"] = r["time_s"] / (base["time_s"] / 2)
        for peer in ("ulysses", "ring", "nosp/1thr"):
            p = by.get((S, peer))
            if p and "time_s" in p:
                if peer != "nosp/1thr":
                    row[f"t/{peer}"] = r["time_s"] / p["time_s"]
                row[f"mem/{peer}"] = max(r["peak_bytes"]) / max(1, max(p["peak_bytes"]))
        m = r["model"]
        if "sent" in m and max(m["sent"]):
            row["bytes/model"] = max(r["sent_bytes"]) / max(m["sent"])
        if "act_bytes" in m:
            row["mem/model"] = max(r["peak_bytes"]) / max(1, max(m["act_bytes"]))
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["S", "label", "time_s", "x_ideal", "t/ulysses", "t/ring", "peak_mb", "mem/ring",
            "mem/nosp/1thr", "sent_mb", "bytes/model", "mem/model"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            cells.append(f"{x:>13.3f}" if isinstance(x, float) else f"{x!s:>13}")
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
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs after the profiled one (0: report the profiled run's time)")
    p.add_argument("--max-gb", type=float, default=3.0, help="skip variants predicted above")
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
    variants = default_variants(a.methods, peers)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, a.ranks, port, a, variants, queue))
             for r in range(a.ranks)]
    for pr in procs:
        pr.start()
    rows = []
    for _ in procs:
        rows += queue.get()
    for pr in procs:
        pr.join()
    records = collect(rows, a.ranks)
    table = ratios(records)
    print_table(table)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "records": records, "ratios": table}, f, indent=1)
    plot(table, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    main()
