"""Model-level side-by-side benchmark: one training step of a megatron-core GPT per variant.

    python tools/bench_model.py --seq-length 4096 --out runs/bench_model

The model is the training driver's (``megatron_seqpar.training.model.build_model``: a
megatron-core ``GPTModel`` in megatron-core DDP, fp32, byte vocabulary, learned positions by
default), on one random token batch. Variants, each measured in the same run:

- ``nosp/1thr``, ``nosp/2thr``: no parallelism, ONE process (TP = CP = 1) with 1 and 2 threads;
- ``<method>/cp2`` for ``--methods`` (rsa, mqsp, lss, lightseq): CP = 2, our core attention,
  zigzag layout as in the driver;
- ``megatron/tp2+sp``: Megatron's tensor + sequence parallelism, TP = 2 with
  ``sequence_parallel=True`` (CP = 1); ``megatron/tp2`` (TP = 2 without SP) on request.

Every 2-rank variant is 2 gloo processes with one thread each. The baselines' core attention
is, by default (``--baseline-attention fused``), the same fused CPU flash kernel ours use
(our provider at CP = 1 degenerates to one local kernel call: what Megatron runs on GPUs with
TE / flash attention); ``--baseline-attention megatron`` uses megatron-core's local
``DotProductAttention`` instead (unfused, holds ``b·h·S·S`` scores per layer).

One timed step, the same for every variant: zero DDP's grad buffers; forward of this rank's
shard (embedding, layers, output layer, vocab-parallel cross entropy), backward of
``sum(token losses) · DP·CP / N`` as the driver does, and ``finalize_model_grads`` (DDP's
gradient all-reduce over DP x CP, the TP all-reduce of the SP norms' gradients, LSS's double
averaging). No optimizer step, no data loading.

Per variant the first step runs under the profiler (``tools/measure.py``): per-rank peak
allocation above what was live before the step (weights and DDP grad buffers excluded). The
second counts bytes sent / received by EVERY c10d op of the step (``measure.count_comm``:
attention, TP/SP all-gathers and reduce-scatters, the DDP gradient all-reduce, the loss's
all-reduces), each with the size of the group it ran on, so ops on Megatron's groups of one
count zero (the profiler's count, which assumes world-sized groups, is kept in the JSON as
``profiler_sent_bytes``); ``attn_sent`` is the part our attention sent
(``megatron_seqpar.comm.count_traffic``). The next ``--repeats`` steps are timed with neither
(median; max over ranks). The table gives RATIOS against the baselines of the same
run ("ideal" = half the one-process 1-thread time) and is saved with the raw figures to
``<out>.json`` and plotted to ``<out>.png``. The mean loss of the step is printed too: every
variant computes the same model on the same tokens, so it must agree to fp32 round-off.
A variant that fails records its error in the table; the run goes on. A method whose
predicted attention memory (``megatron_seqpar.cost``, x layers) exceeds ``--max-gb`` is
skipped (RSA holds ``s x S`` score rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue as queue_mod
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from measure import count_comm, free_port, measure, rank_context, time_call  # noqa: E402

from megatron_seqpar import METHODS  # noqa: E402

BASELINES = ("nosp", "tp2sp", "tp2")
NOSP, TPSP = "nosp/1thr", "megatron/tp2+sp"


@dataclass(frozen=True)
class Variant:
    """One row: ``world`` processes, TP x CP, ``method`` (ours) or None (a baseline)."""

    label: str
    world: int
    tp: int = 1
    cp: int = 1
    method: str | None = None
    sequence_parallel: bool = False
    threads: int = 1


def variants(methods, baselines) -> list[Variant]:
    out = []
    if "nosp" in baselines:
        out += [Variant(NOSP, 1), Variant("nosp/2thr", 1, threads=2)]
    out += [Variant(f"{m}/cp2", 2, cp=2, method=m) for m in methods]
    if "tp2sp" in baselines:
        out.append(Variant(TPSP, 2, tp=2, sequence_parallel=True))
    if "tp2" in baselines:
        out.append(Variant("megatron/tp2", 2, tp=2))
    return out


def train_config(v: Variant, a):
    from megatron_seqpar.training.arguments import TrainConfig

    # baselines: our provider at CP=1 is one local fused kernel call; None: Megatron's local
    method = v.method or (None if a.baseline_attention == "megatron" else "lightseq")
    return TrainConfig(
        model="gpt", num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        seq_length=a.seq_length, position_embedding_type=a.position_embedding_type,
        micro_batch_size=a.batch, global_batch_size=a.batch, world_size=v.world,
        tensor_model_parallel_size=v.tp, context_parallel_size=v.cp,
        sequence_parallel=v.sequence_parallel, seqpar_method=method, device="cpu",
        seed=a.seed, progress_bar=False, plot=False)


def predicted_attention_gb(v: Variant, a) -> float:
    """Analytic attention memory per rank of all layers (0 when the model does not apply)."""
    if v.method is None:
        return 0.0
    from megatron_seqpar.cost import AttnShape, attention_cost

    heads = a.num_attention_heads
    sh = AttnShape(S=a.seq_length, P=v.cp, b=a.batch, hq=heads,
                   hkv=a.num_query_groups or heads, D=a.hidden_size // heads, dtype="fp32",
                   causal=True, layout="zigzag")
    return max(attention_cost(v.method, sh).act_bytes) * a.num_layers / 2**30


def _batch(cfg, a, cp_group):
    """Random tokens ``[b, S]`` (labels = next token), cut to this CP rank's zigzag shard."""
    g = torch.Generator().manual_seed(a.seed)
    full = torch.randint(0, 256, (a.batch, a.seq_length + 1), generator=g)
    b = {"tokens": full[:, :-1], "labels": full[:, 1:],
         "loss_mask": torch.ones(a.batch, a.seq_length),
         "position_ids": torch.arange(a.seq_length).expand(a.batch, -1).contiguous()}
    if cp_group.size() > 1:
        from megatron_seqpar import shard_sequence

        b = {k: shard_sequence(x, dim=1, group=cp_group, layout="zigzag") for k, x in b.items()}
    return b


def _run_variant(rank: int, v: Variant, a) -> dict:
    """Profiled step + timed steps of one variant on this rank."""
    from megatron.core import parallel_state as ps

    from megatron_seqpar.comm import count_traffic
    from megatron_seqpar.training.driver import _forward
    from megatron_seqpar.training.model import build_model

    cfg = train_config(v, a)
    torch.set_num_threads(v.threads)
    ps.initialize_model_parallel(v.tp, 1, context_parallel_size=v.cp,
                                 create_gloo_process_groups=False)
    try:
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        model, _, finalize = build_model(cfg, "cpu")
        model.train()
        batch = _batch(cfg, a, ps.get_context_parallel_group())
        n_tokens = float(a.batch * a.seq_length)
        scale = dp_cp.size() / n_tokens
        last = {}

        def step():
            model.zero_grad_buffer()
            with count_traffic() as traffic:
                s = (_forward(cfg, model, batch).double() * batch["loss_mask"].double()).sum()
                (s * scale).backward()
                finalize([model])
            last.update(loss_sum=s.detach().double(), attn_sent=traffic.sent_bytes)

        dist.barrier()
        t0 = time.perf_counter()
        with measure(rank, v.world) as m:
            step()
        res = dict(peak_bytes=m.peak_bytes, rss_peak_bytes=m.rss_peak_bytes,
                   profiled_time_s=time.perf_counter() - t0,
                   profiler_sent_bytes=m.sent_bytes, profiler_calls=m.calls)
        with count_comm() as c:  # bytes per op with its own group's size (see measure.py)
            step()
        res.update(sent_bytes=c.sent_bytes, recv_bytes=c.recv_bytes, calls=c.calls,
                   sent_by_group_size=c.by_group, attn_sent_bytes=last["attn_sent"])
        loss = last["loss_sum"].clone()
        dist.all_reduce(loss, group=dp_cp)  # outside the measured steps
        res["loss"] = float(loss) / n_tokens
        res["time_s"] = (time_call(step, repeats=a.repeats, warmup=0, barrier=dist.barrier)
                         if a.repeats else res["profiled_time_s"])
        return res
    finally:
        ps.destroy_model_parallel()
        gc.collect()
        torch.set_num_threads(1)


def _worker(rank, world, port, a, todo, queue):
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # reduce_scatter_tensor's name
    from megatron_seqpar.cpu_workarounds import cpu_shims

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=a.timeout))
    with cpu_shims():
        for v in todo:
            gb = predicted_attention_gb(v, a)
            if gb > a.max_gb:
                res = {"skipped": f"predicted attention memory {gb:.3g} GB > --max-gb {a.max_gb}"}
            else:
                try:
                    res = _run_variant(rank, v, a)
                except Exception as e:  # noqa: BLE001 - a failing variant must not end the run
                    res = {"error": f"{type(e).__name__}: {e}"[:300]}
                    if a.verbose:
                        traceback.print_exc()
                    dist.barrier()
            queue.put((rank, v.label, res))
            if rank == 0:
                print(f"  {v.label}: " + (f"{res['time_s']:.2f}s/step" if "time_s" in res
                                          else str(res)[:160]), flush=True)
    queue.put((rank, None, None))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, todo: list[Variant], a) -> dict:
    """Run ``todo`` on ``world`` fresh gloo processes; {label: {rank: result}}."""
    ctx = rank_context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, todo, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict = {v.label: {} for v in todo}
    done = 0
    while done < world:
        try:
            rank, label, res = queue.get(timeout=5)
        except queue_mod.Empty:
            if not all(p.is_alive() for p in procs):
                break
            continue
        if label is None:
            done += 1
        else:
            out[label][rank] = res
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    for ranks in out.values():
        for r in range(world):
            ranks.setdefault(r, {"error": "no result: the process died"})
    return out


def collect(per_world: dict, vs: list[Variant]) -> list[dict]:
    """One record per variant: time = max over ranks, per-rank memory and bytes."""
    recs = []
    for v in vs:
        ranks = per_world[v.label]
        rec = {"label": v.label, "variant": asdict(v), "ranks": ranks}
        rows = [ranks[r] for r in sorted(ranks)]
        if all("time_s" in x for x in rows):
            rec.update(time_s=max(x["time_s"] for x in rows), loss=rows[0]["loss"])
            for k in ("peak_bytes", "sent_bytes", "recv_bytes", "attn_sent_bytes",
                      "rss_peak_bytes"):
                rec[k] = [x[k] for x in rows]
        else:
            bad = next(x for x in rows if "time_s" not in x)
            rec["status"] = bad.get("error") or bad.get("skipped")
        recs.append(rec)
    return recs


def ratios(recs: list[dict]) -> list[dict]:
    """The table: ratios against the one-process and the TP2+SP baselines of the same run."""
    by = {r["label"]: r for r in recs}
    nosp, tpsp = by.get(NOSP, {}), by.get(TPSP, {})
    rows = []
    for r in recs:
        if "time_s" not in r:
            rows.append({"label": r["label"], "status": r["status"]})
            continue
        peak = max(r["peak_bytes"])
        row = {"label": r["label"], "time_s": r["time_s"], "peak_mb": peak / 2**20,
               "sent_mb": max(r["sent_bytes"]) / 2**20,
               "attn_sent_mb": max(r["attn_sent_bytes"]) / 2**20, "loss": r["loss"]}
        if "time_s" in nosp:
            row["t/ideal"] = r["time_s"] / (nosp["time_s"] / 2)
            row["mem/nosp"] = peak / max(1, max(nosp["peak_bytes"]))
        if "time_s" in tpsp:
            row["t/tp2sp"] = r["time_s"] / tpsp["time_s"]
            row["mem/tp2sp"] = peak / max(1, max(tpsp["peak_bytes"]))
        rows.append(row)
    return rows


COLUMNS = ("label", "t/ideal", "t/tp2sp", "mem/nosp", "mem/tp2sp", "peak_mb", "sent_mb",
           "attn_sent_mb", "loss")


def print_table(rows: list[dict]) -> None:
    print(f"{COLUMNS[0]:>16} " + " ".join(f"{c:>12}" for c in COLUMNS[1:]))
    for r in rows:
        if "status" in r:
            print(f"{r['label']:>16}  {r['status']}")
            continue
        cells = [f"{r[c]:>12.6f}" if c == "loss" else f"{r[c]:>12.2f}" if c in r else
                 f"{'':>12}" for c in COLUMNS[1:]]
        print(f"{r['label']:>16} " + " ".join(cells))


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "status" not in r]
    labels = [r["label"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("t/ideal", "time / ideal (half of 1 process, 1 thread)", 1.0),
              ("peak_mb", "peak allocation per rank (MiB)", None),
              ("sent_mb", "MiB sent per rank (every collective)", None))
    for ax, (key, ylabel, ref) in zip(axes, panels):
        ax.bar(range(len(ok)), [r.get(key, 0.0) for r in ok],
               color=["tab:gray" if "/cp2" not in lab else "tab:blue" for lab in labels])
        if key == "sent_mb":
            ax.bar(range(len(ok)), [r["attn_sent_mb"] for r in ok], color="tab:orange",
                   label="of which our attention")
            ax.legend(fontsize=8)
        if ref is not None:
            ax.axhline(ref, color="k", lw=0.6)
        ax.set_xticks(range(len(ok)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=("learned_absolute", "rope"))
    p.add_argument("--batch", type=int, default=1, help="micro batch = global batch")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--baselines", nargs="*", default=["nosp", "tp2sp"], choices=BASELINES)
    p.add_argument("--baseline-attention", default="fused", choices=("fused", "megatron"),
                   help="baselines' core attention: the fused CPU kernel ours use (default) "
                   "or megatron-core's unfused local DotProductAttention")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps after the profiled one (0: report the profiled step)")
    p.add_argument("--max-gb", type=float, default=3.0,
                   help="skip a method whose predicted attention memory per rank is above")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=300.0, help="gloo collective timeout (s)")
    p.add_argument("--verbose", action="store_true", help="print a failing variant's traceback")
    p.add_argument("--out", default="runs/bench_model")
    a = p.parse_args(argv)
    vs = variants(a.methods, a.baselines)
    results: dict = {}
    for world in sorted({v.world for v in vs}):
        todo = [v for v in vs if v.world == world]
        print(f"{world} process{'es' if world > 1 else ''}: {', '.join(v.label for v in todo)}",
              flush=True)
        results.update(run_world(world, todo, a))
    recs = collect(results, vs)
    table = ratios(recs)
    print_table(table)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "records": recs, "ratios": table}, f, indent=1)
    plot(table, a.out + ".png",
         f"megatron-core GPT {a.num_layers}x{a.hidden_size}, {a.num_attention_heads} heads, "
         f"S={a.seq_length}, b={a.batch}, fp32, CPU/gloo, 1 thread per rank: one "
         "forward+backward+grad sync")
    print(f"wrote {a.out}.json and {a.out}.png")
    return table


if __name__ == "__main__":
    main()
