"""LSS double gradient averaging on megatron-core ``DistributedDataParallel`` grad buffers.

Stock Megatron reduces every gradient once, over the combined DP x CP group. LSS averages in
two levels (docs/design.md §5): first over the *sequence* group (Megatron's CP group: the
segments of one sequence, adjacent ranks, so intra-node first in Megatron's rank order), then
over the *pure data-parallel* group (the same segment of different sequences).

Learned absolute position embeddings: rank r only reads and writes the rows of its own (zigzag)
positions, so before level 1 its gradient of such a table is nonzero only on those rows.
  * ``assemble_position_grads=True`` (default, ``lss.Options``): level 1 all-reduces the
    position-embedding ranges over the sequence group too. A SUM of disjoint rows assembles the
    full gradient, and the same ``1/P`` as the rest makes it the single-process one, so every
    CP rank holds every row's gradient, the tables (and their optimizer moments) stay
    identical across CP ranks, and an unmodified optimizer's global-norm clipping and
    checkpoint are exact (Megatron-LM's route).
  * ``assemble_position_grads=False`` (the paper's *owned per segment* variant): level 1 skips
    those ranges and only scales them by ``1/P`` (one nonzero term in a sum of P, divided by
    P: the single-process gradient on the owned rows); E fewer elements are sent. Rows of other
    segments keep a zero gradient on this rank and are never read here, so a rank's grad norm
    misses the other ranks' rows and its table holds stale rows: exact only with an optimizer
    that sums the split norm over CP and with ``sync_position_embeddings`` (plus
    ``assemble_owned_rows`` for the moments) before saving or changing P -- what our driver
    does; on Megatron-LM's route only with ``--clip-grad 0`` and without resuming.

Two levels (``--hierarchical-context-parallel-sizes U R``): nothing changes here. The head
all-to-all lives inside attention; every other layer, the embeddings and the loss still see
this rank's shard of the P-rank zigzag layout, so the sequence group of level 1 is still the
whole CP group (all P ranks hold segments of the same sequences and replicas of every
parameter), and position-embedding rows are still owned by zigzag position. Megatron's
hierarchical CP groups are not used for gradients. Tested exact at CP=4 = U2 x R2
(``tests/test_megatron_two_level.py``: ``lss_ddp`` + ``lss_finalize_model_grads``, the
installed route, and the owned rows).

How it sits on Megatron:
  * ``lss_ddp(config, ddp_config, module)`` is a stock ``DistributedDataParallel`` built with a
    ``ProcessGroupCollection`` whose ``dp_cp`` is the pure DP group, so DDP's own bucket
    communication (and ``gradient_scaling_factor = 1/dp``) is the second-level average.
    ``install_lss_grad_averaging(model_chunks)`` converts DDP chunks that Megatron-LM built
    the stock way (bucket groups re-pointed to the pure DP group).
  * ``lss_finalize_model_grads(seq_group)`` returns a drop-in for
    ``megatron.core.distributed.finalize_model_grads`` (set it as
    ``config.finalize_model_grads_func``): it all-reduces each grad buffer over the sequence
    group (owned variant: skipping position-embedding ranges, which it scales by 1/P) and runs
    Megatron's ``finalize_model_grads`` (DP bucket all-reduce / reduce-scatter, SP layer-norm
    grads, PP embedding grads, per-token scaling). With ``overlap_grad_reduce`` the DP
    reduction has already started in backward; both levels are linear, so the CP average then
    runs after it with the same result.
  * With megatron-core's distributed optimizer nothing is re-pointed: one optimizer instance
    per DP replica (``num_distributed_optimizer_instances`` = DP size), sharded over its CP
    group, makes Megatron's own reduction the two levels (reduce-scatter over CP, then the
    shard all-reduced over DP across instances); ``install_lss_grad_averaging`` only checks the
    groups (``check_distributed_optimizer_levels``, with the bytes per level). Position rows are
    assembled (the reduce-scatter sums whole buffers); the owned variant is not offered there.

Collectives and bytes per step, N = parameters with grad, E = position-embedding elements,
w = bytes per grad element, P = CP size, D = DP size (ring all-reduce sends 2(n-1)/n x payload):
  * level 1: one all-reduce per buffer over the CP group, payload N·w, sent ≈ 2(P-1)/P·N·w
    per rank (owned variant: one per contiguous non-position range, payload (N - E)·w,
    sent ≈ 2(P-1)/P·(N-E)·w);
  * level 2: DDP's bucket all-reduce over the DP group, payload N·w, ≈ 2(D-1)/D·N·w sent;
  * stock Megatron instead: one all-reduce of N·w over DP x CP, ≈ 2(PD-1)/(PD)·N·w sent.
LSS therefore sends more in total than the stock single level; what it buys is hierarchy:
with CP intra-node (Megatron's rank order puts CP ranks next to each other) only level 2
crosses nodes. Example, the parity-test GPT (2 layers, hidden 64, N = 107,136, E = 3,072,
float64, P = D = 2): level 1 sends 857,088 B (owned: 832,512 B), level 2 857,088 B
(1,714,176 B per rank and step; owned 1,689,600 B) against 1,285,632 B for the stock DP x CP
all-reduce. Pre-scaling keeps the result equal
to Megatron's in every mode (``_level2_scaling``: 1/D by default, 1 with
``average_in_collective``, P with ``calculate_per_token_loss``).
No extra memory: everything is in place on DDP's grad buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def position_embedding_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Learned absolute position-embedding tables of ``module`` (LanguageModelEmbedding's)."""
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )

    found = []
    for sub in module.modules():
        if isinstance(sub, LanguageModelEmbedding) and sub.add_position_embedding:
            found.append(sub.position_embeddings.weight)
    return found


def owned_position_rows(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global positions (= position-embedding rows) held by ``cp_rank`` in the zigzag layout."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*CP={2 * cp_size}")
    c = seq_len // (2 * cp_size)
    a, b = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)])


def lss_process_groups(pg_collection=None):
    """``ProcessGroupCollection`` for ``DistributedDataParallel`` that reduces over pure DP.

    Copies Megatron's groups (from ``pg_collection`` or ``parallel_state``) and sets
    ``dp_cp`` (and ``intra_dp_cp``) to the pure data-parallel group. No group is created.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    src = pg_collection or ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "pp", "ep", "cp", "dp", "expt_dp", "embd", "pos_embd"]
    )
    out = ProcessGroupCollection()
    for name in ("tp", "pp", "ep", "cp", "dp", "expt_dp", "embd", "pos_embd"):
        if hasattr(src, name):
            setattr(out, name, getattr(src, name))
    out.dp_cp = out.dp
    out.intra_dp_cp = out.dp
    return out


def _level2_scaling(config, ddp_config, dp_size: int, cp_size: int) -> float:
    """Bucket pre-scale for the DP level so that level 1 (CP mean) x level 2 = Megatron's."""
    if getattr(config, "calculate_per_token_loss", False):
        return float(cp_size)  # Megatron sums over DP x CP: undo level 1's 1/P
    if ddp_config.average_in_collective:
        return 1.0  # AVG over DP after the CP mean = mean over DP x CP
    return 1.0 / dp_size


def lss_ddp(config, ddp_config, module, pg_collection=None, **ddp_kwargs):
    """megatron-core ``DistributedDataParallel`` whose bucket reduction is the pure-DP level."""
    from megatron.core.distributed import DistributedDataParallel

    if ddp_config.num_distributed_optimizer_instances != 1:
        raise ValueError("LSS double averaging supports num_distributed_optimizer_instances=1")
    groups = lss_process_groups(pg_collection)
    model = DistributedDataParallel(config, ddp_config, module, pg_collection=groups,
                                    **ddp_kwargs)
    factor = _level2_scaling(config, ddp_config, groups.dp.size(), groups.cp.size())
    for buf in model.buffers:
        for bucket in buf.buckets:
            bucket.gradient_scaling_factor = factor
    return model


def install_lss_grad_averaging(model_chunks, seq_group=None, dp_group=None, *,
                               assemble_position_grads: bool = True) -> None:
    """Turn DDP chunks built the stock way (reducing over DP x CP) into LSS double averaging.

    For Megatron-LM, which builds the DDP chunks itself: each bucket group's collective is
    re-pointed from the DP x CP group to the pure DP group (pre-scale adjusted, see
    ``_level2_scaling``) and ``config.finalize_model_grads_func`` becomes
    ``lss_finalize_model_grads(seq_group, assemble_position_grads=...)``. Groups default to
    ``parallel_state``'s. Expert parameters (MoE) keep Megatron's own reduction (see
    ``_ddp_buffers``). No collective.

    With the distributed optimizer nothing is re-pointed: the two levels are Megatron's own
    distributed-optimizer instances (``check_distributed_optimizer_levels``).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    seq_group = seq_group or parallel_state.get_context_parallel_group()
    dp_group = dp_group or parallel_state.get_data_parallel_group(with_context_parallel=False)
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    if chunks[0].ddp_config.use_distributed_optimizer:
        check_distributed_optimizer_levels(chunks, seq_group, dp_group)
        return
    config = get_model_config(chunks[0])
    for chunk in chunks:
        ddp_config = chunk.ddp_config
        factor = _level2_scaling(config, ddp_config, dp_group.size(), seq_group.size())
        for group in chunk.bucket_groups:
            group.data_parallel_group = dp_group
            for bucket in group.buckets:
                bucket.gradient_scaling_factor = factor
    config.finalize_model_grads_func = lss_finalize_model_grads(
        seq_group, assemble_position_grads=assemble_position_grads)


def check_distributed_optimizer_levels(model_chunks, seq_group, dp_group) -> None:
    """LSS with megatron-core's distributed optimizer: Megatron's reduction already averages
    in LSS's two levels when each distributed-optimizer instance is one DP replica's CP group
    (``--num-distributed-optimizer-instances`` = DP size; Megatron's rank order puts a CP
    group's ranks next to each other, so its intra-instance groups are the CP groups):

      * level 1, the sequence group: each bucket's reduce-scatter over the intra-instance
        group (the CP group; SUM after DDP's ``1/(D·P)`` pre-scale), which leaves each CP rank
        the sum of its 1/P shard, position-embedding rows assembled;
      * level 2, pure DP: the all-reduce of that shard over the inter-instance group (the DP
        group of the same CP rank); at DP=1 there is no second level.

    Bytes per rank and step (N gradient elements of w bytes, P = CP, D = DP): level 1 sends
    (P-1)/P·N·w, level 2 2(D-1)/D·N/P·w; the optimizer then all-gathers updated parameters over
    the CP group, (P-1)/P·N·w_param (stock Megatron: reduce-scatter and all-gather over all of
    DP x CP). Each DP replica holds one full optimizer state, 1/P of it per rank.

    Checks that every bucket group reduces over exactly those groups and raises ``ValueError``
    naming the fix otherwise (e.g. ``--num-distributed-optimizer-instances`` not the DP size).
    No collective.
    """
    cp_ranks = dist.get_process_group_ranks(seq_group)
    dp_ranks = dist.get_process_group_ranks(dp_group)
    for chunk in model_chunks:
        for group in chunk.bucket_groups:  # dense parameters; experts: see _ddp_buffers
            intra = dist.get_process_group_ranks(group.intra_distributed_optimizer_instance_group)
            inter = getattr(group, "inter_distributed_optimizer_instance_group", None)
            inter = dist.get_process_group_ranks(inter) if inter is not None else [dist.get_rank()]
            if (intra, inter) != (cp_ranks, dp_ranks):
                raise ValueError(
                    f"LSS with the distributed optimizer needs each optimizer instance to be "
                    f"one DP replica's CP group (ranks {cp_ranks}), then an all-reduce over the "
                    f"DP group (ranks {dp_ranks}); DDP reduces over ranks {intra}, then {inter}: "
                    f"pass --num-distributed-optimizer-instances {len(dp_ranks)} (Megatron's "
                    "default --order keeps a CP group's ranks together)")


def _ddp_buffers(model_chunk):
    """The dense grad buffers of a DDP chunk: the ones LSS averages in two levels.

    Expert parameters (MoE) are not among them: Megatron reduces their grad buffers over the
    expert data-parallel group, which already spans the CP and DP ranks of one expert shard
    (megatron-core folds CP into expert data parallelism), in one level, exact, and LSS leaves
    that reduction as it is (neither re-pointed nor averaged over CP first).
    """
    buffers = list(getattr(model_chunk, "buffers", []))
    if not buffers and not getattr(model_chunk, "expert_parallel_buffers", None):
        raise ValueError("LSS double averaging needs a megatron-core DistributedDataParallel model")
    return buffers


def _complement(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for lo, hi in sorted(ranges):
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < n:
        out.append((pos, n))
    return out


def average_over_sequence_group(model_chunk, seq_group: dist.ProcessGroup, *,
                                assemble_position_grads: bool = True) -> int:
    """Level 1: average the grad buffers of one DDP chunk over ``seq_group``, in place.

    ``assemble_position_grads`` (default): one blocking all-reduce (SUM, then ``1/P``) of each
    whole buffer; the position-embedding ranges, nonzero only on each rank's own rows, come
    out assembled (payload = the whole buffer). Otherwise (owned variant) position-embedding
    ranges are skipped and only scaled by ``1/P``: one all-reduce per contiguous non-position
    range (payload = buffer minus the position tables). Returns the payload in bytes (per
    rank, before the ring factor).
    """
    p = dist.get_world_size(seq_group)
    if p == 1:
        return 0
    pos_params = () if assemble_position_grads else set(
        position_embedding_params(model_chunk.module))
    payload = 0
    for buf in _ddp_buffers(model_chunk):
        skip = [buf.param_index_map[q][:2] for q in pos_params if q in buf.param_index_map]
        for lo, hi in skip:
            buf.grad_data[lo:hi].mul_(1.0 / p)
        for lo, hi in _complement(skip, buf.grad_data.numel()):
            part = buf.grad_data[lo:hi]
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=seq_group)
            part.mul_(1.0 / p)
            payload += part.numel() * part.element_size()
    return payload


def lss_finalize_model_grads(seq_group: dist.ProcessGroup, *,
                             assemble_position_grads: bool = True):
    """Drop-in for ``finalize_model_grads``: CP average (level 1), then Megatron's DP one.

    Use with models wrapped by ``lss_ddp``. ``assemble_position_grads``: see
    ``average_over_sequence_group`` and the module docstring. Returns ``fn(model,
    num_tokens=None, pg_collection=None, force_all_reduce=False)``, megatron-core's signature.
    """
    from megatron.core.distributed import finalize_model_grads

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        chunks = model if isinstance(model, list) else [model]
        overlapped = any(c.ddp_config.overlap_grad_reduce for c in chunks)
        if not overlapped:
            for c in chunks:
                average_over_sequence_group(
                    c, seq_group, assemble_position_grads=assemble_position_grads)
        finalize_model_grads(chunks, num_tokens=num_tokens, pg_collection=pg_collection,
                             force_all_reduce=force_all_reduce)
        if overlapped:  # DP reduction already ran in backward; the levels commute
            for c in chunks:
                average_over_sequence_group(
                    c, seq_group, assemble_position_grads=assemble_position_grads)

    return finalize


def assemble_owned_rows(t: torch.Tensor, seq_group: dist.ProcessGroup, seq_len: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The table ``t`` (a position embedding or an optimizer moment of one) whose first
    ``seq_len`` rows are taken from their owners; into ``out`` (default: a new tensor).

    Collective: one all-reduce over ``seq_group`` of the first ``seq_len`` rows (zeroed except
    the owned ones, so the sum assembles the table); rows beyond ``seq_len`` are copied as they
    are (they get a zero gradient on every rank, so they stay equal across ranks).
    """
    p, r = dist.get_world_size(seq_group), dist.get_rank(seq_group)
    rows = owned_position_rows(seq_len, r, p)
    with torch.no_grad():
        mine = torch.zeros_like(t[:seq_len])
        mine[rows] = t[rows]
        dist.all_reduce(mine, group=seq_group)
        if out is None:
            out = t.clone()
        out[:seq_len].copy_(mine)
    return out


def sync_position_embeddings(module: torch.nn.Module, seq_group: dist.ProcessGroup,
                             seq_len: int) -> None:
    """Make every rank's position tables equal the owners' rows (before save / resharding):
    ``assemble_owned_rows`` in place, one all-reduce per table. Needed only for the owned
    variant (``assemble_position_grads=False``); assembled tables are already equal."""
    for w in position_embedding_params(module):
        assemble_owned_rows(w.data, seq_group, seq_len, out=w.data)
