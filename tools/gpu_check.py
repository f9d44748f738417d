"""One-shot device check of the CUDA path: ONE command, at most 360 s on one H100 or H200.

    python tools/gpu_check.py --out runs/gpu_check          # on the GPU machine
    python tools/gpu_check.py --dry-run --out /tmp/gpu_dry  # every section on CPU, tiny sizes

Writes ``<out>.json`` (everything) and ``<out>.md`` (the tables), rewritten after every
section. Sections, each in its own process with its own time budget, start-up included (a
failure or timeout is recorded and the next one runs); each case's row is sent to this
process as soon as the case ends, so a section killed at its budget keeps its finished rows.

a. kernels: every backend x block kind x dtype against the float64 reference on the device
   (max |error| / max |reference| of out, dq, dk, dv; empty rows must give out 0, lse -inf);
b. methods: rsa, mqsp, lss, lightseq x contiguous/zigzag x causal/padded at P = 2 and 4
   processes sharing the one GPU through ``comm.stage_through_host`` (gloo over host copies),
   bf16 against float64; host syncs inside the attention call counted with
   ``torch.cuda.set_sync_debug_mode`` (the staging copies excepted);
c. efficiency: one rank's LightSeq zigzag attention (rank 0 of P = 8: its own shard and the
   K/V of every other rank, merged; forward + backward, no communication) against ONE flash
   call with the same number of visible (query, key) pairs, bf16, head dim 128, local lengths
   4K-32K: TFLOP/s of each and the ratio (goal >= 0.9);
d. a megatron-core GPT training step (8 layers, hidden 2048, 16 heads, bf16) at CP = 1 with
   each method's core-attention spec against megatron-core's own (local) core attention:
   tokens/s and peak-memory ratios. The length is the longest of 8K, 4K, 2K whose estimated
   baseline memory fits in 60% of the free device memory (``torch.cuda.mem_get_info``; 8K on
   an 80 GB H100); RSA is skipped, saying so, where its ``s x S`` score rows would not fit;
   if the baseline still fails, every variant drops to the next length;
e. ``examples/pretrain_gpt.py --device cuda`` for 50 steps: the loss must fall.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_seqpar import METHODS  # noqa: E402

BUDGET_S = {"a": 40, "b": 90, "c": 50, "d": 90, "e": 60}  # 330 s, each incl. its start-up
TOTAL_S = 360  # the whole command, kills included: a rerun fits in 15 minutes of device time
MARGIN_S = 5  # what a section keeps back to report before its budget ends
TOL = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 1e-3}  # relative to max |reference|
KINDS = ("full", "causal", "padded", "causal+padded", "mask")


def _dtype(name):
    return getattr(torch, name)


def _relerr(a, r) -> float:
    return float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))


def _mask(kind, b, sq, sk, device):
    """(causal, bool mask or None) of a block kind; padded kinds include a sample whose keys
    are all padded and, causal, rows that see only padding."""
    causal = kind.startswith("causal")
    if kind in ("full", "causal"):
        return causal, None
    mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool, device=device)
    mask[0, ..., : sk // 8] = True
    mask[-1] = True
    if kind == "mask":  # an offset triangle (what the planner emits for misaligned runs)
        tri = torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(sk // 4)
        mask = mask | tri.view(1, 1, sq, sk)
    return causal, mask


# ----------------------------------------------------------------------------- a: kernels
def section_kernels(a):
    """Yields one row per backend x block kind x dtype."""
    from megatron_seqpar import kernels_cuda
    from megatron_seqpar.kernels import BACKENDS, block_attention, block_attention_backward

    dev = a.device
    backends = (["cpu_flash"] if dev == "cpu" else ["cuda_flash", "cuda_efficient", "cuda_cudnn"]
                ) + ["auto"]
    b, hq, hkv, s, d = (2, 4, 2, 48, 16) if a.dry_run else (2, 8, 2, 1000, 128)
    cap = kernels_cuda.capability(torch.device(dev))  # None on CPU
    for dtype in ("bfloat16", "float16", "float32"):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(b, s, h, d, generator=g, device=dev).to(_dtype(dtype))
                       .transpose(1, 2) for h in (hq, hkv, hkv, hq))
        for kind in KINDS:
            causal, mask = _mask(kind, b, s, s, dev)
            ref = block_attention(q.double(), k.double(), v.double(), scale=d**-0.5,
                                  causal=causal, mask=mask, backend="reference")
            gref = block_attention_backward(do.double(), q.double(), k.double(), v.double(),
                                            *ref, scale=d**-0.5, causal=causal, mask=mask,
                                            backend="reference")
            for name in backends:
                row = dict(backend=name, kind=kind, dtype=dtype)
                kind_args = (dev, _dtype(dtype), mask is not None, causal, d)
                pick = kernels_cuda.choose_backend(*kind_args, capability=cap) \
                    if name == "auto" else name
                if not kernels_cuda.supports(pick, *kind_args, capability=cap):
                    yield dict(row, runs="n/a (dispatched elsewhere)")
                    continue
                try:
                    be = BACKENDS[pick]
                    out, lse = be.forward(q, k, v, d**-0.5, causal, mask)
                    grads = be.backward(do, q, k, v, out, lse, d**-0.5, causal, mask)
                    errs = [_relerr(out, ref[0])] + [_relerr(x, r) for x, r in zip(grads, gref)]
                    empty_ok = bool(torch.equal(torch.isneginf(lse), torch.isinf(ref[1])))
                    finite = all(bool(torch.isfinite(x).all()) for x in (out, *grads))
                    row = dict(row, runs=pick, out=errs[0], dq=errs[1], dk=errs[2], dv=errs[3],
                               empty_rows_ok=empty_ok, finite=finite,
                               ok=empty_ok and finite and max(errs) < TOL[dtype])
                except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
                    row = dict(row, runs=pick, error=f"{type(exc).__name__}: {exc}"[:300])
                yield row


# ----------------------------------------------------------------------------- b: methods
def _method_rank(rank, world, port, a, queue):
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    import megatron_seqpar as msp
    from megatron_seqpar.comm import stage_through_host
    from megatron_seqpar.kernels import block_attention, block_attention_backward

    torch.set_num_threads(1)
    dev = a.device
    if dev == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=timedelta(seconds=max(10.0, a.deadline - time.time())))
    b, hq, hkv, d, S = (2, 4, 2, 16, 16 * world) if a.dry_run else (2, 8, 2, 128, 2048)
    try:
        for mode in ("causal", "padded"):
            causal = mode == "causal"
            g = torch.Generator(device=dev).manual_seed(1)
            q, k, v, do = (torch.randn(b, S, h, d, generator=g, device=dev).bfloat16()
                           for h in (hq, hkv, hkv, hq))
            kpm = None
            if not causal:  # BERT: bidirectional, right padding, one fully padded sample
                kpm = torch.zeros(b, S, dtype=torch.bool, device=dev)
                kpm[0, S - S // 3:] = True
                kpm[-1] = True
            mask = None if kpm is None else kpm.view(b, 1, 1, S)
            t = lambda x: x.double().transpose(1, 2)
            ref = block_attention(t(q), t(k), t(v), scale=d**-0.5, causal=causal, mask=mask,
                                  backend="reference")
            gref = block_attention_backward(t(do), t(q), t(k), t(v), *ref, scale=d**-0.5,
                                            causal=causal, mask=mask, backend="reference")
            refs = [ref[0].transpose(1, 2)] + [x.transpose(1, 2) for x in gref]
            del ref, gref
            for layout in ("contiguous", "zigzag"):
                shard = lambda x: msp.shard_sequence(x, dim=1, layout=layout)  # noqa: B023
                for method in METHODS:
                    row = dict(P=world, method=method, layout=layout, mode=mode)
                    try:
                        mine = [shard(x).requires_grad_() for x in (q, k, v)]
                        syncs = 0
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            if dev == "cuda":
                                torch.cuda.set_sync_debug_mode(1)
                            try:
                                with stage_through_host():
                                    out = msp.attention(
                                        *mine, method=method, causal=causal, layout=layout,
                                        key_padding_mask=None if kpm is None else shard(kpm))
                                    out.backward(shard(do))
                            finally:
                                if dev == "cuda":
                                    torch.cuda.set_sync_debug_mode(0)
                            syncs = sum("synchroniz" in str(w.message) for w in caught)
                        errs = [_relerr(x, shard(r)) for x, r in
                                zip([out.detach()] + [m.grad for m in mine], refs)]
                        row = dict(row, out=errs[0], dq=errs[1], dk=errs[2], dv=errs[3],
                                   host_syncs=syncs, ok=max(errs) < TOL["bfloat16"])
                    except Exception as exc:  # noqa: BLE001
                        row = dict(row, error=f"{type(exc).__name__}: {exc}"[:300])
                    queue.put((rank, row))  # as soon as the case ends
        queue.put((rank, None))  # this rank is done
    except Exception:  # noqa: BLE001
        queue.put((rank, {"P": world, "error": traceback.format_exc()[-600:]}))
        queue.put((rank, None))
    finally:
        dist.destroy_process_group()


def _merge(rows: list[dict]) -> dict:
    """One case's row from every rank's: the worst error over ranks, host syncs summed."""
    row = dict(rows[0])
    for key in ("out", "dq", "dk", "dv"):
        if all(key in r for r in rows):
            row[key] = max(r[key] for r in rows)
    if all("ok" in r for r in rows):
        row["ok"] = all(r["ok"] for r in rows)
        row["host_syncs"] = sum(r["host_syncs"] for r in rows)
    errs = [r["error"] for r in rows if "error" in r]
    if errs:
        row["error"] = errs[0]
    return row


def section_methods(a):
    """Yields each case's merged row as soon as every rank has reported it. Ranks that stop
    answering before the section's budget ends are reported and killed, and the next world
    runs if time is left."""
    import queue as queue_mod

    from measure import free_port, rank_context

    ctx = rank_context()
    for world in (2, 4):
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_method_rank, args=(r, world, port, a, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        cases: list[dict] = []  # per case: {rank: row}
        seen, done = [0] * world, 0
        try:
            while done < world:
                left = a.deadline - time.time()
                try:
                    rank, row = queue.get(timeout=max(0.1, left))
                except queue_mod.Empty:
                    yield dict(P=world, error=f"ranks stopped answering at the section's "
                               f"deadline (cases reported per rank: {seen})")
                    break
                if row is None:
                    done += 1
                    continue
                i, seen[rank] = seen[rank], seen[rank] + 1
                cases += [{} for _ in range(i + 1 - len(cases))]
                cases[i][rank] = row
                if len(cases[i]) == world:
                    yield _merge([cases[i][r] for r in range(world)])
        finally:
            for p in procs:
                p.join(timeout=10 if done == world else 1)
                if p.is_alive():
                    p.kill()


# ----------------------------------------------------------------------------- c: efficiency
def _pairs(blocks) -> int:
    n = 0
    for blk in blocks:
        sq, sk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
        n += sq * (sq + 1) // 2 if blk.kind == "causal" else sq * sk
    return n


def _timed(fn, dev, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _our_rank_step(q, do, kv, runs, r, kw):
    """Rank ``r``'s attention over every rank's K/V (merged), forward + backward."""
    from megatron_seqpar.kernels import attend, attend_backward

    out = lse = None
    for j in range(len(kv)):
        out, lse = attend(q, runs(r), *kv[j], runs(j), out=out, lse=lse, **kw)
    dq = None
    for j in range(len(kv)):
        dq, _, _ = attend_backward(do, q, runs(r), *kv[j], runs(j), out, lse, dq=dq, **kw)


def _one_flash_call(flash, q, do, kb, vb, scale):
    out, lse = flash.forward(q, kb, vb, scale, False, None)
    flash.backward(do, q, kb, vb, out, lse, scale, False, None)


def section_efficiency(a):
    from functools import partial

    from megatron_seqpar.kernels import BACKENDS, plan_blocks
    from megatron_seqpar.layouts import local_runs

    dev, P, r = a.device, 8, 0
    dtype = torch.float32 if a.dry_run else torch.bfloat16
    h, d = (2, 16) if a.dry_run else (16, 128)
    lengths = (64, 128) if a.dry_run else (4096, 8192, 16384, 32768)
    flash = BACKENDS["cpu_flash" if dev == "cpu" else "cuda_flash"]
    flop = lambda n: 3.5 * 4 * n * d * h  # fwd 4·pairs·d·h, bwd 2.5x fwd
    for s in lengths:
        g = torch.Generator(device=dev).manual_seed(2)
        mk = partial(torch.randn, generator=g, device=dev, dtype=dtype)
        q, do = (mk(1, s, h, d).transpose(1, 2) for _ in range(2))
        kv = [tuple(mk(1, s, h, d).transpose(1, 2) for _ in range(2)) for _ in range(P)]
        runs = partial(local_runs, "zigzag", world_size=P, local_len=s)
        pairs = sum(_pairs(plan_blocks(runs(r), runs(j), True)) for j in range(P))
        L = max(64, round(pairs / s / 64) * 64)  # keys of the equal-work flash call
        kb, vb = (mk(1, L, h, d).transpose(1, 2) for _ in range(2))
        kw = dict(scale=d**-0.5, causal=True)
        t_ours = _timed(partial(_our_rank_step, q, do, kv, runs, r, kw), dev, a.repeats)
        t_one = _timed(partial(_one_flash_call, flash, q, do, kb, vb, d**-0.5), dev, a.repeats)
        ours_tf, one_tf = flop(pairs) / t_ours / 1e12, flop(s * L) / t_one / 1e12
        yield (dict(local_len=s, P=P, rank=r, pairs=pairs, flash_keys=L,
                         ours_s=t_ours, flash_s=t_one, ours_tflops=ours_tf,
                         flash_tflops=one_tf, ratio=ours_tf / one_tf))
        del q, do, kv, kb, vb
        if dev == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- d: GPT step
def _gpt_variant(a, method, seq):
    from megatron.core import parallel_state as ps

    from megatron_seqpar.training.arguments import TrainConfig
    from megatron_seqpar.training.driver import _forward
    from megatron_seqpar.training.model import build_model

    dev = a.device
    small = a.dry_run
    cfg = TrainConfig(model="gpt", num_layers=2 if small else GPT_LAYERS,
                      hidden_size=64 if small else 2048,
                      num_attention_heads=4 if small else GPT_HEADS,
                      seq_length=seq, micro_batch_size=1, global_batch_size=1, world_size=1,
                      seqpar_method=method, device=dev, bf16=dev == "cuda", progress_bar=False,
                      plot=False)
    ps.initialize_model_parallel(1, 1, context_parallel_size=1, create_gloo_process_groups=False)
    try:
        model, _, finalize = build_model(cfg, dev)
        model.train()
        g = torch.Generator().manual_seed(3)
        full = torch.randint(0, 256, (1, seq + 1), generator=g)
        batch = {"tokens": full[:, :-1].to(dev), "labels": full[:, 1:].to(dev),
                 "position_ids": torch.arange(seq, device=dev)[None]}

        def step():
            model.zero_grad_buffer()
            _forward(cfg, model, batch).float().mean().backward()
            finalize([model])

        step()  # warm-up
        base = 0
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = _timed(step, dev, a.repeats)
        peak = torch.cuda.max_memory_allocated() - base if dev == "cuda" else 0
        return dict(variant=method or "megatron-core local", seq=seq, tokens_per_s=seq / t,
                    step_s=t, peak_bytes=peak)
    finally:
        ps.destroy_model_parallel()


GPT_LAYERS, GPT_HEADS = 8, 16


def attention_bytes(method, seq: int, layers: int = GPT_LAYERS, heads: int = GPT_HEADS) -> int:
    """Rough device bytes of section d's attention at CP=1, b=1 (what decides its length):
    megatron-core's local attention keeps bf16 probabilities per layer and makes fp32 softmax
    transients (~12 B per score); RSA keeps fp32 ``s x S`` score rows per layer; the others
    keep no score matrix."""
    scores = heads * seq * seq
    if method is None:
        return layers * scores * 2 + scores * 12
    if method == "rsa":
        return (layers + 1) * scores * 4
    return 0


def gpt_lengths(free_bytes: int | None, share: float = 0.6) -> tuple[int, ...]:
    """The lengths section d tries, longest first: 8K, 4K, 2K whose baseline fits in
    ``share`` of the free device memory (all three when it is unknown)."""
    seqs = (8192, 4096, 2048)
    if free_bytes is None:
        return seqs
    return tuple(s for s in seqs if attention_bytes(None, s) <= share * free_bytes) or (2048,)


def section_gpt(a):
    """Yields the baseline's row, then each method's, at the longest length that fits."""
    import torch.distributed as dist
    from measure import free_port

    if a.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if a.device == "cpu":
        from megatron_seqpar.cpu_workarounds import cpu_shims

        shims = cpu_shims()
        shims.__enter__()
    free = None if a.device == "cpu" else torch.cuda.mem_get_info()[0]
    seqs = (128, 64) if a.dry_run else gpt_lengths(free)
    for i, seq in enumerate(seqs):  # the baseline first: where it cannot run, all drop a length
        base = _gpt_row(a, None, seq)
        yield base
        if "error" in base and i < len(seqs) - 1:
            continue
        for method in METHODS:
            need = attention_bytes(method, seq)
            if free is not None and need > 0.6 * free:
                yield dict(variant=method, seq=seq,
                           skipped=f"its score rows need ~{need / 2**30:.0f} GiB, over 60% of "
                           f"the {free / 2**30:.0f} GiB free")
                continue
            row = _gpt_row(a, method, seq)
            if "error" not in row and "error" not in base:
                row["tokens_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
                row["peak_ratio"] = (row["peak_bytes"] / base["peak_bytes"]
                                     if base["peak_bytes"] else None)
            yield row
        return


def _gpt_row(a, method, seq) -> dict:
    try:
        return _gpt_variant(a, method, seq)
    except Exception as exc:  # noqa: BLE001 - an OOM baseline is a result too
        return dict(variant=method or "megatron-core local", seq=seq,
                    error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if a.device == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- e: pretrain
def section_pretrain(a):
    from megatron_seqpar.training import report

    log_dir = os.path.join(a.work, "pretrain_gpt")
    steps = 8 if a.dry_run else 50
    size = (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "128"] if a.dry_run else
            ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
             "--seq-length", "2048", "--bf16"])
    cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--device",
           a.device, "--train-iters", str(steps), "--seqpar-method", "lightseq",
           "--no-progress-bar", "--no-plot", "--log-dir", log_dir,
           "--data-cache-path", os.path.join(a.work, "data_cache"), *size]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         timeout=max(5.0, a.deadline - time.time()))
    if res.returncode:
        raise RuntimeError(f"exit {res.returncode}: {res.stderr[-600:]}")
    s = report.summary(os.path.join(log_dir, report.LOG_NAME), window=min(10, steps // 2))
    yield dict(steps=s["steps"], first_loss=s["first_mean"], last_loss=s["last_mean"],
               drop=s["drop"], tokens_per_s=s["tokens_per_s"], ok=s["last_mean"] <
               s["first_mean"], command=" ".join(cmd[1:]))


SECTIONS = {"a": ("kernels vs float64", section_kernels),
            "b": ("methods on one GPU (staged), bf16 vs float64", section_methods),
            "c": ("efficiency: LightSeq zigzag rank step vs one flash call", section_efficiency),
            "d": ("megatron-core GPT step at CP=1", section_gpt),
            "e": ("examples/pretrain_gpt.py, loss falls", section_pretrain)}


# ----------------------------------------------------------------------------- driver
def _section_child(key, a, queue, fn=None):
    """Run a section (``fn``: a stand-in generator, for tests), sending each row as it comes."""
    os.setpgrp()  # its own process group: a timeout kills the section and its ranks
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    try:
        for row in (fn or SECTIONS[key][1])(a):
            queue.put(("row", row))
        queue.put(("ok", None, time.perf_counter() - t0))
    except Exception:  # noqa: BLE001
        queue.put(("error", traceback.format_exc()[-1500:], time.perf_counter() - t0))


def run_section(key, a, left_s: float, fn=None) -> dict:
    """Section ``key`` in a child process under its budget (or what the command has left):
    ``{status, rows, seconds, ...}``, the rows received before a timeout kept."""
    import copy
    import queue as queue_mod

    from measure import rank_context

    budget = min(a.budget_scale * BUDGET_S[key], left_s)
    title = SECTIONS[key][0]
    if budget < 5:
        return dict(status="skipped", error="the command's total time budget is spent",
                    rows=[], seconds=0.0, title=title, budget_s=budget)
    a = copy.copy(a)
    a.deadline = time.time() + budget - MARGIN_S  # what the section plans its waits by
    ctx = rank_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=_section_child, args=(key, a, queue, fn))
    t0 = time.monotonic()
    proc.start()
    deadline, rows, res = t0 + budget, [], None
    while res is None and time.monotonic() < deadline:
        try:
            msg = queue.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except queue_mod.Empty:
            if not proc.is_alive() and queue.empty():
                res = dict(status="error", seconds=time.monotonic() - t0,
                           error=f"section process died (exit code {proc.exitcode})")
            continue
        if msg[0] == "row":
            rows.append(msg[1])
        elif msg[0] == "ok":
            res = dict(status="ok", seconds=msg[2])
        else:
            res = dict(status="error", error=msg[1], seconds=msg[2])
    if res is None:
        res = dict(status="timeout", seconds=budget,
                   error=f"section {key} ran past its {budget:.0f} s budget; the {len(rows)} "
                   "rows before it are kept")
    if res["status"] != "timeout":
        proc.join(timeout=10)
    if proc.is_alive() or res["status"] == "timeout":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.join(timeout=5)
    return dict(res, rows=rows, title=title, budget_s=budget)


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# gpu_check ({meta['device_name']}, torch {meta['torch']}, "
             f"{'DRY RUN on CPU' if meta['dry_run'] else 'device run'})", ""]
    for key, res in results.items():
        lines += [f"## {key}. {res['title']} - {res['status']} ({res['seconds']:.0f} s of "
                  f"{res['budget_s']:.0f})", ""]
        if res["status"] != "ok":
            lines += ["```", res.get("error", ""), "```", ""]
        rows = res.get("rows") or []
        if not rows:
            continue
        cols = []
        for row in rows:
            cols += [c for c in row if c not in cols and c != "command"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="writes <out>.json and <out>.md")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--dry-run", action="store_true",
                   help="every section on CPU at tiny sizes (proves the script, no GPU needed)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (c, d)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every section's time budget")
    a = p.parse_args(argv)
    a.device = "cpu" if a.dry_run else "cuda"
    if a.repeats is None:
        a.repeats = 1 if a.dry_run else 3
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run on CPU")
    a.work = os.path.abspath(a.out) + "_work"
    os.makedirs(a.work, exist_ok=True)
    meta = dict(dry_run=a.dry_run, torch=torch.__version__,
                device_name="cpu" if a.dry_run else torch.cuda.get_device_name(0),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    t0 = time.perf_counter()
    results = {}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for key in a.sections:
        results[key] = run_section(key, a, TOTAL_S - (time.perf_counter() - t0))
        meta["total_s"] = time.perf_counter() - t0
        print(markdown({key: results[key]}, meta).split("\n", 2)[2], flush=True)
        with open(a.out + ".json", "w") as f:  # after every section: a killed run keeps them
            json.dump(dict(meta=meta, sections=results), f, indent=1, default=str)
        with open(a.out + ".md", "w") as f:
            f.write(markdown(results, meta))
    print(f"[gpu_check] {meta['total_s']:.0f} s; wrote {a.out}.json and {a.out}.md", flush=True)
    return results


if __name__ == "__main__":
    main()
