"""The workarounds a CPU *training run* of megatron-core 0.16.1 needs, each named and explained.

Applied only by ``driver.main`` (and the training tests) when the device is CPU, as a context
manager that undoes every change on exit; never at import time, never by the library itself
(DESIGN §7.10). Test support has a sibling (``tests/megatron_cpu.py``) covering the same ground
for layer tests.

Patches (``applied()`` installs them):

- ``current_device``: ``torch.cuda.current_device`` answers ``torch.device("cpu")``. Megatron
  passes it as ``device=`` to allocations (model buffers, DDP's param/grad buffers, RoPE's
  ``inv_freq``); on a CPU-only torch it raises "Torch not compiled with CUDA enabled".
- ``cuda_synchronize``: ``torch.cuda.synchronize`` is a no-op. megatron-core's
  ``dist_checkpointing`` writer (``FileSystemWriterAsync.preload_tensors``) calls it after
  its device-to-host copies, even when every tensor already lives on the CPU.
- ``recompute_rng``: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
  read and write the CPU generator's state. Megatron's activation recomputation
  (``--recompute-granularity``, ``tensor_parallel.checkpoint``) saves the CUDA RNG state
  before the forward and restores it for the recompute, through ``torch.cuda`` calls.
- ``rope_cp_index``: ``rotary_pos_embedding.get_pos_emb_on_this_cp_rank`` is replaced by the
  same zigzag selection (chunks ``r`` and ``2P-1-r``) built on the embedding's device; upstream
  builds its index with ``pin_memory=True`` and ``.cuda()``. Reached only with RoPE and CP>1.
- ``rng_tracker_fork``: the CUDA RNG tracker's ``fork()`` becomes a null context. Megatron
  forks the tracker around dropout in model-parallel regions and the tracker reads
  ``torch.cuda.get_rng_state``; on CPU, dropout there draws from the default CPU generator
  (seeded identically on every rank by the driver).

Not patches, upstream hooks or substitutions the driver makes on CPU (recorded in the log):

- ``use_cpu_initialization=True`` in ``TransformerConfig`` (weights built on CPU, from the
  default generator, identical on every rank given the same seed).
- Explicit causal ``attention_mask`` for megatron-core's local attention (its default causal
  mask is allocated on ``"cuda"``) and explicit position ids.
- ``torch.optim.AdamW`` stepping on DDP's ``main_grad`` instead of ``get_megatron_optimizer``
  (its ``FP32Optimizer`` allocates on ``"cuda"``); gradient clipping by
  ``torch.nn.utils.clip_grad_norm_`` on the same grads (no TP-duplicated params at TP=1; with
  TP>1 the norm is computed over this rank's shards plus an all-reduce, see ``driver``).
"""

from __future__ import annotations

import contextlib

import torch

SUBSTITUTIONS = (
    "optimizer: torch.optim.AdamW on DDP main_grad (megatron FP32Optimizer allocates on cuda)",
    "weights: TransformerConfig(use_cpu_initialization=True)",
    "attention mask/position ids passed explicitly (megatron default causal mask is on cuda)",
)


def _cpu_device():
    return torch.device("cpu")


def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Device-agnostic twin of megatron-core's ``get_pos_emb_on_this_cp_rank`` (zigzag)."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    pos_emb = pos_emb.view(*shape[:seq_dim], 2 * cp_size, -1, *shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


@contextlib.contextmanager
def _setattr(obj, name: str, value):
    old = getattr(obj, name)
    had = name in vars(obj) if hasattr(obj, "__dict__") else True
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def applied():
    """Install the five CPU workarounds above; restore everything on exit."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.tensor_parallel import random as mrandom

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_setattr(torch.cuda, "current_device", _cpu_device))
        stack.enter_context(_setattr(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(_setattr(mrandom, "_get_cuda_rng_state",
                                     lambda *a, **k: torch.get_rng_state()))
        stack.enter_context(_setattr(mrandom, "_set_cuda_rng_state",
                                     lambda state, *a, **k: torch.set_rng_state(state)))
        stack.enter_context(_setattr(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank",
                                     pos_emb_on_this_cp_rank))
        stack.enter_context(_setattr(tracker, "fork",
                                     lambda *a, **k: contextlib.nullcontext()))
        yield
