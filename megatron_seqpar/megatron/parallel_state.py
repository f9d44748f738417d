"""Where the sequence axis and the pure data-parallel axis come from inside megatron-core.

The sequence group of every method is Megatron's *context-parallel* group; the group LSS
averages over second is Megatron's *pure* data-parallel group (``with_context_parallel=False``).
Both are read from a ``ProcessGroupCollection`` when one is given (``pg_collection.cp``,
``pg_collection.dp``) and from ``megatron.core.parallel_state`` otherwise. Nothing here creates
a process group, runs a collective or holds state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_seqpar.headpar import TwoLevelGroups


@dataclass(frozen=True)
class SequenceAxis:
    """The sequence (context-parallel) group and this rank's place in it."""

    group: dist.ProcessGroup
    rank: int
    world_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")


def _from_collection(pg_collection, name: str):
    group = getattr(pg_collection, name, None)
    if group is None:
        raise ValueError(
            f"pg_collection has no '{name}' process group; build it with "
            f"ProcessGroupCollection.use_mpu_process_groups(required_pgs=[..., '{name}'])"
        )
    return group


def sequence_group(pg_collection=None) -> dist.ProcessGroup:
    """Megatron's context-parallel group: ``pg_collection.cp`` or ``parallel_state``'s."""
    if pg_collection is not None:
        return _from_collection(pg_collection, "cp")
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError(
            "megatron parallel state is not initialised: call "
            "parallel_state.initialize_model_parallel(context_parallel_size=...) first, "
            "or pass pg_collection"
        )
    return parallel_state.get_context_parallel_group()


def sequence_axis(pg_collection=None) -> SequenceAxis:
    """The sequence group with this rank's rank and the group size (no collective)."""
    group = sequence_group(pg_collection)
    return SequenceAxis(group=group, rank=group.rank(), world_size=group.size())


def sequence_world_size(pg_collection=None) -> int:
    """Number of ranks sharing one sequence (Megatron's CP size)."""
    return sequence_group(pg_collection).size()


def data_parallel_group(pg_collection=None) -> dist.ProcessGroup:
    """Megatron's pure data-parallel group (without the CP ranks): ``pg_collection.dp``."""
    if pg_collection is not None:
        return _from_collection(pg_collection, "dp")
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=False)


def tp_group(pg_collection=None) -> dist.ProcessGroup:
    """Megatron's tensor-parallel group: ``pg_collection.tp`` or ``parallel_state``'s."""
    if pg_collection is not None:
        return _from_collection(pg_collection, "tp")
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _mpu_hierarchical_groups(cp_group):
    """``parallel_state``'s hierarchical CP groups when its CP group has ``cp_group``'s ranks."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    mine = parallel_state.get_context_parallel_group(check_initialized=False)
    if not groups or mine is None:
        return None
    same = (dist.get_process_group_ranks(mine) == dist.get_process_group_ranks(cp_group))
    return groups if same else None


def two_level_groups(pg_collection=None, head_parallel: int = 1):
    """Megatron's hierarchical CP groups as a ``headpar.TwoLevelGroups`` for ``U =
    head_parallel``, or None when Megatron has none (then ``msp.attention`` builds its own,
    the same consecutive-rank split).

    ``--hierarchical-context-parallel-sizes U R`` makes level 0 the groups of ``U``
    consecutive CP ranks and level 1 the ``R`` ranks strided by ``U``: exactly the inner and
    outer groups of ``megatron_seqpar.headpar``. Read from ``pg_collection.hcp``; a collection
    without that field (e.g. Attention's default one of ``tp`` and ``cp`` only) falls back to
    ``parallel_state.get_hierarchical_context_parallel_groups()`` when ``parallel_state``'s CP
    group has the same ranks as ``pg_collection.cp``. Sizes must be ``[U, R]`` with ``U*R``
    = CP. Raises ``ValueError`` naming the fix when ``U`` does not divide the CP size or the
    groups disagree with ``U``. No collective, no group created.
    """

    cp_group = sequence_group(pg_collection)
    cp = cp_group.size()
    if head_parallel < 1 or cp % head_parallel:
        raise ValueError(f"two-level sequence parallelism: U={head_parallel} (head_parallel / "
                         f"--hierarchical-context-parallel-sizes U R) does not divide the "
                         f"context-parallel size {cp}; choose U dividing CP with U*R = CP")
    groups = getattr(pg_collection, "hcp", None) if pg_collection is not None else None
    if not groups:
        groups = _mpu_hierarchical_groups(cp_group)
    if not groups:
        return None
    sizes = [g.size() for g in groups]
    if len(groups) != 2 or sizes[0] != head_parallel or sizes[0] * sizes[1] != cp:
        raise ValueError(f"Megatron's hierarchical context-parallel groups have sizes {sizes}; "
                         f"two-level sequence parallelism needs exactly [U, R] = "
                         f"[{head_parallel}, {cp // head_parallel}] "
                         "(--hierarchical-context-parallel-sizes U R with U*R = CP)")
    return TwoLevelGroups(inner=groups[0], outer=groups[1])
