"""Every CPU workaround the Megatron tests need, in one place (test support only).

megatron-core 0.16.1 assumes CUDA in a few spots that a CPU/gloo run reaches. The library never
patches Megatron (DESIGN §5, §7.10); tests install these shims around a model's lifetime with

    with megatron_cpu.cpu_shims():
        ...build, run forward/backward, DDP...

and every patch is undone on exit (workers of ``tests/distributed.py`` are reused across tests).
Upstream hooks are used instead of patches wherever they exist: ``use_cpu_initialization=True``
and ``perform_initialization=True`` in ``TransformerConfig`` (weights built on CPU), explicit
``pg_collection`` / ``parallel_state`` groups, position ids passed by the caller.

The shims, each with the reason it exists:

1. ``torch.cuda.current_device`` answers ``torch.device("cpu")``. Megatron calls it as the
   ``device=`` of allocations (GPTModel/BertModel buffers, DDP grad buffers, RoPE
   ``inv_freq``); on a CPU-only torch it raises "Torch not compiled with CUDA enabled".
2. ``rotary_pos_embedding.get_pos_emb_on_this_cp_rank``: the upstream version builds its index
   with ``pin_memory=True`` and ``.cuda()``; the replacement builds the same zigzag index
   (chunks ``r`` and ``2P-1-r``) on the embedding's device. Only reached with RoPE and CP>1.
3. ``tensor_parallel.get_cuda_rng_tracker().fork`` is a null context. Megatron forks the CUDA
   RNG tracker around dropout in model-parallel regions (``torch.cuda.get_rng_state`` on CPU
   raises). Only valid with dropout 0, which the parity tests use.
4. ``tensor_parallel.random._get_cuda_rng_state`` returns None and ``_set_cuda_rng_state``
   does nothing: activation recompute (``CheckpointFunction``) saves and restores the CUDA RNG
   state next to the CPU one (``torch.cuda.get_rng_state`` raises on CPU). The CPU RNG state is
   still saved and restored by Megatron. Only reached with ``recompute_granularity`` set.
5. ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` / ``torch.cuda.is_available``-gated
   calls are left alone: none is reached by the code paths the tests run.

A CPU *training* run needs 1 (always), 2 (RoPE with CP>1), 3 (any dropout site under the RNG
tracker, i.e. TP>1 or attention dropout) and 4 (activation recompute); it also cannot use
``get_megatron_optimizer`` (its FP32Optimizer allocates on "cuda") and must use a
``torch.optim`` optimizer on DDP's ``main_grad`` instead; the causal mask must be passed (or
left to our provider, which ignores it): megatron's ``get_default_causal_mask`` allocates on
"cuda".
"""

from __future__ import annotations

import contextlib

import torch


def _cpu_current_device():
    return torch.device("cpu")


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """CPU twin of megatron-core's ``get_pos_emb_on_this_cp_rank`` (zigzag chunks r, 2P-1-r)."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    pos_emb = pos_emb.view(*shape[:seq_dim], 2 * cp_size, -1, *shape[seq_dim + 1 :])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])


class _NullRngTracker:
    """Stands in for ``CudaRNGStatesTracker``: ``fork()`` is a no-op (dropout must be 0)."""

    def __init__(self, real):
        self._real = real

    @contextlib.contextmanager
    def fork(self, name=None):  # noqa: ARG002 - same signature as the real tracker
        yield

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def cpu_shims():
    """Install shims 1-4 above; undo them on exit, even on error."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.tensor_parallel import random as tp_random

    saved = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (rope_utils, "get_pos_emb_on_this_cp_rank", rope_utils.get_pos_emb_on_this_cp_rank),
        (
            rotary_pos_embedding,
            "get_pos_emb_on_this_cp_rank",
            rotary_pos_embedding.get_pos_emb_on_this_cp_rank,
        ),
        (tp_random, "get_cuda_rng_tracker", tp_random.get_cuda_rng_tracker),
        (tensor_parallel, "get_cuda_rng_tracker", tensor_parallel.get_cuda_rng_tracker),
        (tp_random, "_get_cuda_rng_state", tp_random._get_cuda_rng_state),
        (tp_random, "_set_cuda_rng_state", tp_random._set_cuda_rng_state),
    ]
    real_tracker = tp_random.get_cuda_rng_tracker()
    null_tracker = _NullRngTracker(real_tracker)
    try:
        torch.cuda.current_device = _cpu_current_device
        rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        tp_random.get_cuda_rng_tracker = lambda *a, **k: null_tracker
        tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker
        tp_random._get_cuda_rng_state = lambda *a, **k: None
        tp_random._set_cuda_rng_state = lambda *a, **k: None
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
