"""Longest sequence each method trains one step of a small GPT-ish stack within a memory budget.

    python tools/max_seqlen.py --ranks 1 2 4 --budget-mb 96 --out runs/max_seqlen

For P in ``--ranks`` it starts P gloo processes (one thread each) and, for every method (ours)
and baseline (Ulysses, PyTorch ring, all-gather K/V; no-SP at P=1), searches the longest
sequence S (a multiple of ``2·P·--granule``) for which one training step (forward + backward of
``--layers`` pre-norm layers: LayerNorm, QKV, attention, projection, LayerNorm, MLP) keeps every
rank's peak allocation, measured by the profiler (``tools/measure.py``), within
``--budget-mb``. Doubling then bisection; all ranks agree on each probe (max over ranks). It
prints the lengths and their ratios to the no-SP and RSA lengths and writes ``<out>.json``
and ``<out>.png``.

Depth matters for the ratios: what an attention method holds only while its own layer runs
(receive buffers, a gathered K/V, returns in flight) is paid once, while every layer's saved
activations add up. The default stack has 4 layers (``--layers 2`` shows the shallow case,
where one layer's transient buffers weigh twice as much).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import BASELINES  # noqa: E402
from measure import free_port, measure, rank_context  # noqa: E402

from megatron_seqpar import METHODS  # noqa: E402


class Stack(torch.nn.Module):
    """``layers`` pre-norm transformer layers whose attention is ``attn(q, k, v)``."""

    def __init__(self, layers: int, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict(dict(
                ln1=torch.nn.LayerNorm(hidden), qkv=torch.nn.Linear(hidden, 3 * hidden),
                proj=torch.nn.Linear(hidden, hidden), ln2=torch.nn.LayerNorm(hidden),
                fc1=torch.nn.Linear(hidden, 4 * hidden), fc2=torch.nn.Linear(4 * hidden, hidden),
            )))

    def forward(self, x, attn):
        b, s, h = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, s, 3, self.heads, -1).unbind(2)
            x = x + blk["proj"](attn(q, k, v).reshape(b, s, h))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](x))))
        return x


def _attn_fn(name: str, group):
    if name in BASELINES:
        b = BASELINES[name]
        return (lambda q, k, v: b.fn(q, k, v, group=group, causal=True)), b
    import megatron_seqpar as msp

    return (lambda q, k, v: msp.attention(q, k, v, method=name, group=group, causal=True,
                                          layout="zigzag")), None


def _probe(rank, world, name, S, a, model) -> int:
    """Peak bytes of one training step at global length S (max over ranks; -1 on error)."""
    fn, base = _attn_fn(name, None)
    s = S // world
    peak = -1
    try:
        x = torch.randn(1, s, a.hidden, requires_grad=True)
        ctx = base.context(None, seq_len=S, causal=True) if base is not None else None
        with measure(rank, world) as m:
            if ctx is not None:
                with ctx:
                    model(x, fn).pow(2).mean().backward()
            else:
                model(x, fn).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        peak = m.peak_bytes
    except Exception as e:  # noqa: BLE001 - a failed probe does not fit
        if rank == 0:
            print(f"    {name} S={S}: {type(e).__name__}: {str(e)[:100]}", flush=True)
    t = torch.tensor([peak, -peak], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -1 if -t[1].item() < 0 else int(t[0].item())


def search(rank, world, name, a, model) -> int:
    granule = 2 * world * a.granule
    budget = a.budget_mb * 2**20
    fits = lambda S: 0 <= _probe(rank, world, name, S, a, model) <= budget
    if not fits(granule):
        return 0
    lo, hi = 1, 2
    while hi * granule <= a.max_seqlen and fits(hi * granule):
        lo, hi = hi, hi * 2
    while hi - lo > 1 and (hi - lo) * granule > a.tolerance * lo * granule:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * granule) else (lo, mid)
    return lo * granule


def _worker(rank, world, port, a, names, queue):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    torch.manual_seed(0)
    model = Stack(a.layers, a.hidden, a.heads)
    out = {}
    for name in names:
        out[name] = search(rank, world, name, a, model)
        if rank == 0:
            print(f"  P={world} {name}: {out[name]}", flush=True)
    if rank == 0:
        queue.put(out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, a, names) -> dict:
    ctx = rank_context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, names, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    res = queue.get()
    for p in procs:
        p.join()
    return res


def plot(results: dict, base: int | None, path: str) -> None:
    """Bars of the longest sequence per method, as a multiple of no-SP, one group per P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in results if w > 1]
    names = sorted({n for w in worlds for n in results[w]})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [results[w].get(name, 0) / base if base else 0 for w in worlds]
        ax.bar([j + i * width for j in range(len(worlds))], ys, width, label=name)
    for j, w in enumerate(worlds):
        ax.hlines(w, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles=":")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], [f"P={w}" for w in worlds])
    ax.set_ylabel("longest S / no-SP (dotted: P)")
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--peers", nargs="*", default=["ulysses", "ring", "allgather"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--budget-mb", type=float, default=96.0)
    p.add_argument("--granule", type=int, default=16, help="S is a multiple of 2*P*granule")
    p.add_argument("--tolerance", type=float, default=0.01, help="stop bisecting within this")
    p.add_argument("--max-seqlen", type=int, default=1 << 17)
    p.add_argument("--out", default="runs/max_seqlen")
    a = p.parse_args(argv)
    peers = [x for x in a.peers if BASELINES[x].available()]
    results = {}
    for world in a.ranks:
        names = ["nosp"] if world == 1 else [*a.methods, *peers]
        if world > 1 and "ulysses" in names and a.heads % world:
            names.remove("ulysses")
        results[world] = run(world, a, names)
    base = results.get(1, {}).get("nosp")
    print(f"\n{'P':>3} {'method':>10} {'max S':>8} {'x no-SP':>8} {'x RSA':>8}")
    for world, res in results.items():
        rsa = res.get("rsa")
        for name, S in res.items():
            ratio = f"{S / base:.2f}" if base else ""
            vs_rsa = f"{S / rsa:.2f}" if rsa else ""
            print(f"{world:>3} {name:>10} {S:>8} {ratio:>8} {vs_rsa:>8}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "results": results, "nosp": base}, f, indent=1)
    plot(results, base, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    main()
