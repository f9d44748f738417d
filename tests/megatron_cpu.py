"""Every CPU workaround megatron-core 0.16.1 needs, in one place: test support, not library.

megatron-core assumes CUDA in a few spots that a CPU/gloo run reaches. The library never
patches Megatron (DESIGN §5, §7.10). The tests, and the example entry points when they run on
CPU (``examples/pretrain_*.py`` pass ``cpu_shims`` to the driver), install these shims around
a model's lifetime with

    with megatron_cpu.cpu_shims():
        ...build, run forward/backward, DDP, save a checkpoint...

and every patch is undone on exit (workers of ``tests/distributed.py`` are reused across
tests). Upstream hooks are used instead of patches wherever they exist:
``use_cpu_initialization=True`` in ``TransformerConfig`` (weights built on CPU), explicit
``pg_collection`` / ``parallel_state`` groups, position ids and causal masks passed by the
caller, and a ``torch.optim`` optimizer instead of ``get_megatron_optimizer`` (whose
``FP32Optimizer`` allocates on "cuda").

The shims, each with the reason it exists:

1. ``current_device``: ``torch.cuda.current_device`` answers ``torch.device("cpu")``.
   Megatron passes it as ``device=`` to allocations (GPTModel/BertModel buffers, DDP grad
   buffers, RoPE ``inv_freq``); on a CPU-only torch it raises "Torch not compiled with CUDA
   enabled". Always needed.
2. ``rope_cp_index``: ``get_pos_emb_on_this_cp_rank`` (in ``rope_utils`` and
   ``rotary_pos_embedding``) builds its index with ``pin_memory=True`` and ``.cuda()``; the
   replacement builds the same zigzag index (chunks ``r`` and ``2P-1-r``) on the embedding's
   device. Reached with RoPE and CP>1.
3. ``rng_tracker_fork``: the CUDA RNG tracker's ``fork()`` is a null context. Megatron forks
   the tracker around dropout in model-parallel regions, reading ``torch.cuda.get_rng_state``;
   on CPU, dropout there draws from the default CPU generator (seeded identically on every
   rank by the caller). Reached with TP>1 or dropout under the tracker.
4. ``recompute_rng``: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
   read and write the CPU generator's state. Activation recompute (``CheckpointFunction``)
   saves and restores the CUDA RNG state through ``torch.cuda`` calls. Reached with
   ``recompute_granularity`` set.
5. ``cuda_synchronize``: ``torch.cuda.synchronize`` is a no-op. ``dist_checkpointing``'s writer
   (``FileSystemWriterAsync.preload_tensors``) calls it after its device-to-host copies, even
   when every tensor already lives on the CPU. Reached when saving a checkpoint.
6. ``sp_torch_norm``: megatron-core's torch norm (``WrappedTorchNorm``, the ``LNImpl`` of the
   local specs and the final block norm when neither apex nor Transformer Engine is installed)
   asserts ``sequence_parallel`` is off. The shim builds the same ``torch.nn.LayerNorm`` /
   ``RMSNorm`` and marks its weight and bias ``sequence_parallel=True``, as apex's
   ``FusedLayerNorm`` and TE's norms do, so ``finalize_model_grads`` sums their gradients over
   the TP group (each TP rank normalises 1/TP of the tokens). Reached with
   ``--sequence-parallel`` (Megatron's TP+SP baseline) on a machine without apex/TE.
"""

from __future__ import annotations

import contextlib
import copy

import torch


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


def _sp_torch_norm(original):
    """``WrappedTorchNorm.__new__`` that accepts ``sequence_parallel`` (shim 6)."""

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)  # a shallow copy: the caller's config keeps SP on
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    return new


@contextlib.contextmanager
def _setattr(obj, name: str, value):
    """Set ``obj.name`` for the duration; restore it (or remove an instance attribute)."""
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
def cpu_shims():
    """Install shims 1-6 above; undo them on exit, even on error."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with contextlib.ExitStack() as stack:
        patch = lambda obj, name, value: stack.enter_context(_setattr(obj, name, value))  # noqa: E731
        patch(torch.cuda, "current_device", _cpu_device)
        patch(rope_utils, "get_pos_emb_on_this_cp_rank", pos_emb_on_this_cp_rank)
        patch(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", pos_emb_on_this_cp_rank)
        patch(tracker, "fork", lambda *a, **k: contextlib.nullcontext())
        patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
        patch(torch.cuda, "synchronize", lambda *a, **k: None)
        new = vars(WrappedTorchNorm)["__new__"]  # the staticmethod itself, restored as is
        WrappedTorchNorm.__new__ = staticmethod(_sp_torch_norm(new.__func__))
        stack.callback(setattr, WrappedTorchNorm, "__new__", new)
        yield
