"""Sequence-parallel attention on 8K tokens, checked against single-process attention.

    torchrun --standalone --nproc-per-node 2 examples/attention_demo.py [--method lightseq]
        [--documents 16]       # a packed stream of 16 documents (cu_seqlens)
        [--head-parallel 2]    # two levels: head all-to-all in pairs of ranks x the method

Every rank holds its zigzag shard of q, k, v; ``msp.attention`` computes exact causal
attention over the whole sequence (forward and backward), inside each document when packed.
Rank 0 gathers the result and compares it with PyTorch's single-process attention over the
full sequence, and every rank reports the bytes it sent.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import megatron_seqpar as msp
from megatron_seqpar.comm import count_traffic


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=msp.METHODS, default="lightseq")
    p.add_argument("--layout", choices=msp.LAYOUTS, default="zigzag")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--documents", type=int, default=1,
                   help="pack this many documents of varied length into the sequence")
    p.add_argument("--head-parallel", type=int, default=1,
                   help="U: head all-to-all inside groups of U ranks (two-level)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gen = torch.Generator().manual_seed(0)
    S, h, hkv, d = args.seq_length, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(1, S, n, d, generator=gen) for n in (h, hkv, hkv))
    dout = torch.randn(1, S, h, d, generator=gen)
    cu = documents(S, args.documents, 2 * world, gen) if args.documents > 1 else None
    shard = lambda x: msp.shard_sequence(x, dim=1, layout=args.layout, cu_seqlens=cu)
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    opts = msp.method_options(args.method)(head_parallel=args.head_parallel)

    start = time.perf_counter()
    with count_traffic() as traffic:
        out = msp.attention(ql, kl, vl, method=args.method, causal=True, layout=args.layout,
                            cu_seqlens=cu, options=opts)
        fwd_bytes = traffic.sent_bytes
        out.backward(shard(dout))
    elapsed = time.perf_counter() - start

    full = msp.gather_sequence(out.detach(), dim=1, layout=args.layout, cu_seqlens=cu)
    dq = msp.gather_sequence(ql.grad, dim=1, layout=args.layout, cu_seqlens=cu)
    if rank == 0:
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        if cu is not None:  # block-diagonal: a token sees its own document only
            doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
            mask &= doc[:, None] == doc[None, :]
        ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2),
                                             vr.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=True).transpose(1, 2)
        ref.backward(dout)
        err = (full - ref).abs().max().item() / ref.abs().max().item()
        gerr = (dq - qr.grad).abs().max().item() / qr.grad.abs().max().item()
        packed = f", {args.documents} documents" if cu is not None else ""
        two = f", head_parallel={args.head_parallel}" if args.head_parallel > 1 else ""
        print(f"{args.method} on {world} ranks, S={S}, {args.layout}{packed}{two}: "
              f"forward+backward {elapsed:.2f}s; max rel error vs single-process attention: "
              f"out {err:.2e}, dq {gerr:.2e}")
    s = S // world
    kv_step = 2 * s * hkv * d * 4  # one rank's K+V shard, fp32 bytes
    dist.barrier()
    print(f"rank {rank}: sent {fwd_bytes / 2**20:.2f} MiB forward, "
          f"{traffic.sent_bytes / 2**20:.2f} MiB forward+backward "
          f"(one K/V shard = {kv_step / 2**20:.2f} MiB)", flush=True)
    dist.destroy_process_group()


def documents(S, n, unit, gen):
    """cu_seqlens of ``n`` documents of varied length (multiples of ``unit``) filling ``S``."""
    if S % unit or S // unit < n:
        raise SystemExit(f"--seq-length {S} cannot hold {n} documents of multiples of {unit}")
    cuts = torch.randperm(S // unit - 1, generator=gen)[: n - 1].add_(1).sort().values
    return torch.cat([torch.tensor([0]), cuts * unit, torch.tensor([S])])


if __name__ == "__main__":
    main()
