"""Every CPU workaround megatron-core 0.16.1 and Megatron-LM's ``megatron.training`` need, in
one place, for CPU runs only.

megatron-core assumes CUDA in a few spots that a CPU/gloo run reaches. The attention, the
specs and the training code never patch Megatron (docs/design.md). Only the CPU entry points
import this module, explicitly: the driver when its device is the CPU
(``training.driver.main``), the Megatron-LM launcher (``tools/megatron_lm_cpu.py``) and the
tests. ``import megatron_seqpar`` never imports it, nor does a CUDA run
(``tests/test_imports.py`` checks both). They install these shims around a model's lifetime
with

    with cpu_workarounds.cpu_shims():
        ...build, run forward/backward, DDP, save a checkpoint...

and every patch is undone on exit (workers of ``tests/distributed.py`` are reused across
tests). Upstream hooks are used instead of patches wherever they exist:
``use_cpu_initialization=True`` in ``TransformerConfig`` (weights built on CPU), explicit
``pg_collection`` / ``parallel_state`` groups, position ids and causal masks passed by the
caller, and a ``torch.optim`` optimizer instead of ``get_megatron_optimizer`` (whose
``FP32Optimizer`` allocates on "cuda").

One more runs before megatron-core is imported at all, in the entry points that know they
run on the CPU before they import it (``examples/pretrain_{gpt,bert}.py`` on a machine without
CUDA, ``tools/megatron_lm_cpu.py``, the tests and their gloo workers):

0. ``import_megatron_core`` (eager fusions): megatron-core sets ``jit_fuser = torch.compile``
   when it is imported and decorates its fused helpers with it (bias-GeLU/SwiGLU/GeGLU,
   bias-dropout-add, cross entropy, MoE activations, norms); each ``torch.compile`` call
   imports TorchDynamo and Inductor, 1.8 of the 4.7 CPU seconds ``import megatron.core``
   takes here, paid by every process, and a decorated helper that a CPU run called would be
   compiled by Inductor's C++ backend. ``torch.compile`` answers an identity decorator during
   that import only (then restored), so ``jit_fuser`` is the identity and the helpers run
   eagerly: the same arithmetic, as with megatron-core's own ``disable_jit_fuser`` had it
   applied before the decorators ran. The CPU runs keep the fusion flags off anyway.

The shims, each with the reason it exists:

1. ``current_device``: ``torch.cuda.current_device`` answers ``torch.device("cpu")``.
   Megatron passes it as ``device=`` to allocations (GPTModel/BertModel buffers, DDP grad
   buffers, RoPE ``inv_freq``); on a CPU-only torch it raises "Torch not compiled with CUDA
   enabled". Always needed.
2. ``rope_cp_index``: ``get_pos_emb_on_this_cp_rank`` (in ``rope_utils`` and
   ``rotary_pos_embedding``) builds its index with ``pin_memory=True`` and ``.cuda()``; the
   replacement builds the same zigzag index (chunks ``r`` and ``2P-1-r``) on the embedding's
   device. Reached with RoPE and CP>1.
3. ``rng_tracker_fork``: the CUDA RNG tracker's ``fork()`` is a null context (patched on the
   class, since Megatron-LM's initialisation re-creates the tracker). Megatron forks
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
7. ``sliding_window_mask``: megatron-core's local attention builds its sliding-window mask
   with ``get_sliding_window_causal_mask``, which allocates on ``device="cuda"``; the
   replacement builds the same ``[sq, sk]`` bool mask on the CPU. Reached by stock
   ``DotProductAttention`` with ``window_size`` set (the CP=1 oracle of our window tests,
   Megatron-LM at CP=1); our provider never calls it.
7b. ``mla_without_te``: ``MultiLatentAttention.__init__`` tests
   ``isinstance(self.linear_proj, TELinear)`` whenever ``megatron.core.extensions.
   transformer_engine`` imports, which it does without Transformer Engine, with ``TELinear``
   a ``MagicMock`` stand-in: ``isinstance(x, <mock>)`` raises ``TypeError``, so MLA cannot be
   built without TE. The shim puts a class there that no module is an instance of (only when
   ``TELinear`` is not a class). Reached by any MLA model on this machine.
7c. ``null_streams``: ``torch.cuda.Stream`` / ``current_stream`` / ``default_stream`` /
   ``stream`` are no-ops; CPU work is in program order. megatron-core's DDP makes a side
   stream for the all-reduce across distributed-optimizer instances
   (``--num-distributed-optimizer-instances`` > 1: LSS with the distributed optimizer at
   DP > 1), and Megatron-LM's ``get_model`` builds DDP on one.
7d. ``moe_without_te``: ``moe_utils`` imports ``te_general_gemm`` with the other Transformer
   Engine fusions inside one ``try``; without TE the import fails before the name is bound,
   and the router's ``RouterGatingLinearFunction`` then reads it (``NameError: name
   'te_general_gemm' is not defined``). The shim binds it to None (only when it is missing),
   which selects the router's own ``torch.mm``/``addmm`` path. Reached by any MoE layer
   (``--num-experts``) without TE, at any CP size.
7e. ``moe_host_splits``: the all-to-all token dispatcher moves its split sizes "to the
   host" with ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which only acts on
   CUDA tensors; on CPU they stay tensors and ``all_to_all_single`` rejects a tensor as its
   split sizes. The shim (in ``token_dispatcher``, where it is called) converts CPU tensors
   the same way. Reached by ``--moe-token-dispatcher-type alltoall`` with EP > 1.

Megatron-LM's ``megatron.training`` (its ``pretrain()`` loop: initialisation, Megatron's own
optimizer, schedules, ``finalize_model_grads``, logging, checkpoints) needs a few more, in
``training_cpu_shims()``; ``tools/megatron_lm_cpu.py`` installs both sets around
``pretrain_gpt.py`` / ``pretrain_bert.py`` (the script's directory first on ``sys.path``, so
these patch the checkout's ``megatron`` package):

8. ``allow_no_cuda``: ``pretrain()`` calls ``initialize_megatron``, which asserts
   ``torch.cuda.is_available()`` unless ``allow_no_cuda=True``; the shim passes that.
9. ``device_count`` / ``set_device``: ``torch.cuda.device_count`` answers 1 and ``set_device``
   does nothing. ``_initialize_distributed`` builds the model-parallel groups, and
   ``_set_random_seed`` seeds the model-parallel RNG tracker, only when it sees a device.
10. ``cuda_to_cpu`` (``CudaToCpu``, a ``TorchFunctionMode``): tensors that ``megatron.training``
   and Megatron's optimizer create with ``device="cuda"`` (loss accumulators, grad-norm
   buffers, start-time and exit flags, ``Module.cuda()``) are made on the CPU, and
   ``Tensor.type()`` answers the CUDA type name (``clip_grad_by_total_norm_fp32`` asserts
   ``'torch.cuda.FloatTensor'``; the mixed-precision optimizer sorts parameters by those names).
   Megatron's own optimizer (``get_megatron_optimizer``: Adam with fp32 grad-norm clipping)
   therefore runs unchanged; nothing is computed differently.
11. (moved to 7c: megatron-core's own DDP needs it too.)
12. ``dataset_helpers``: ``compile_helpers`` would run ``make`` inside the checkout (which
    needs pybind11 and a writable checkout); instead every rank imports the ``helpers_cpp``
    extension built into the installed megatron-core wheel of the same version (its
    ``helpers.cpp`` is identical), unless the checkout has its own build.
13. ``fused_kernels``: ``megatron.legacy.fused_kernels.load`` probes ``nvcc`` under
    ``CUDA_HOME`` and makes a build directory in the checkout; it builds nothing in 0.16.1.
    A no-op.
14. ``warmup_jit``: ``_warmup_jit_function`` runs the TorchScript bias-GeLU /
    bias-dropout-add fusions on CUDA tensors to warm them up; skipped (pass the
    ``--no-bias-*-fusion`` flags on CPU).
15. ``device_arch``: ``validate_args`` asks ``get_device_arch_version()`` (a CUDA query) when
    TP or CP > 1; it answers 9.
16. ``cuda_rng_state``: ``torch.cuda.get_rng_state`` / ``set_rng_state`` read and write the CPU
    generator (the RNG tracker's ``add`` and checkpoint save/load of RNG states call them).
17. ``bert_te_spec``: ``pretrain_bert.py`` imports ``bert_layer_with_transformer_engine_spec``
    at module level, which raises without Transformer Engine; the name becomes a spec that
    raises only if a layer is built from it (CPU runs pass ``--spec local`` or
    ``--seqpar-method``).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch


def _identity_compile(model=None, **kwargs):
    """``torch.compile`` as the identity: the function itself, or a decorator returning it."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_core() -> None:
    """Import megatron-core with its fused helpers eager (shim 0); a no-op once it is
    imported (then the decorators already ran)."""
    if "megatron.core" in sys.modules:
        return
    with _setattr(torch, "compile", _identity_compile):
        import megatron.core  # noqa: F401
        import megatron.core.jit  # noqa: F401  (jit_fuser bound while compile is the identity)


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


class _NoTELinear:
    """Stands in for Transformer Engine's ``TELinear`` where TE is absent (shim 7b)."""


def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask`` (True = masked), on the CPU."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    m = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(m, diagonal=skv - sq + window_size[1])


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
    """Install shims 1-7e above; undo them on exit, even on error."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    with contextlib.ExitStack() as stack:
        patch = lambda obj, name, value: stack.enter_context(_setattr(obj, name, value))
        patch(torch.cuda, "current_device", _cpu_device)
        patch(rope_utils, "get_pos_emb_on_this_cp_rank", pos_emb_on_this_cp_rank)
        patch(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", pos_emb_on_this_cp_rank)
        # on the class: Megatron-LM's initialisation re-creates the tracker (force_reset)
        patch(tp_random.CudaRNGStatesTracker, "fork", lambda *a, **k: contextlib.nullcontext())
        patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
        patch(torch.cuda, "synchronize", lambda *a, **k: None)
        patch(fused_softmax, "get_sliding_window_causal_mask", sliding_window_mask)
        patch(torch.cuda, "Stream", _NullStream)  # 7c
        patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
        patch(torch.cuda, "default_stream", lambda *a, **k: _NullStream())
        patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
        if not isinstance(mla.TELinear, type):  # 7b
            patch(mla, "TELinear", _NoTELinear)
        if "te_general_gemm" not in vars(moe_utils):  # 7d
            moe_utils.te_general_gemm = None
            stack.callback(delattr, moe_utils, "te_general_gemm")
        patch(token_dispatcher, "maybe_move_tensor_to_cpu", _host_copy)  # 7e
        new = vars(WrappedTorchNorm)["__new__"]  # the staticmethod itself, restored as is
        WrappedTorchNorm.__new__ = staticmethod(_sp_torch_norm(new.__func__))
        stack.callback(setattr, WrappedTorchNorm, "__new__", new)
        yield


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpu(torch.overrides.TorchFunctionMode):
    """Shim 10: a torch function mode that puts every ``"cuda"`` tensor on the CPU.

    Tensor factories called with ``device="cuda"`` (or ``torch.device("cuda", i)``), and
    ``Tensor.to("cuda")`` / ``Tensor.cuda()`` (so ``Module.cuda()`` too), get the CPU instead.
    ``Tensor.type()`` (no argument) of a CPU tensor answers the CUDA name
    (``"torch.cuda.FloatTensor"``): Megatron's optimizer checks parameter and gradient types
    by those names (``clip_grad_by_total_norm_fp32`` asserts them, the fp16 optimizer sorts
    parameters by them). Nothing else is touched: every computation runs as written.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            on_cpu = args[0].device.type == "cpu"
            return name.replace("torch.", "torch.cuda.", 1) if on_cpu else name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for CPU tensors too (shim 7e): what it returns for a CUDA
    tensor (a host tensor, or its numpy array), so split sizes are host sequences."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor
    return tensor


class _NullEvent:
    """What ``_NullStream.record_event`` returns: already complete."""

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Shim 7c: ``torch.cuda.Stream`` / ``current_stream()`` on CPU, where work is in order.

    All of them are one stream (equal to each other): code that asks "am I on a side
    stream?" (MoE's token dispatcher, before its device-to-host copies) hears no."""

    def __init__(self, *args, **kwargs):
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs) -> _NullEvent:
        return _NullEvent()

    def synchronize(self):
        pass


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _needs_transformer_engine(*args, **kwargs):
    raise ImportError("bert_layer_with_transformer_engine_spec needs Transformer Engine, which "
                      "is not installed; pass --spec local (or --seqpar-method ...)")


def _prebuilt_dataset_helpers():
    """``compile_helpers`` replacement (shim 12): use a built ``helpers_cpp`` instead of ``make``.

    Returns True when it registered the module (False: already importable)."""
    import importlib.metadata
    import importlib.util

    name = "megatron.core.datasets.helpers_cpp"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return False  # the checkout has its own build
    where = importlib.metadata.distribution("megatron-core").locate_file("megatron/core/datasets")
    built = sorted(Path(where).glob("helpers_cpp*.so"))
    if not built:
        raise ImportError(f"no helpers_cpp*.so in {where}: reinstall megatron-core==0.16.1")
    spec = importlib.util.spec_from_file_location(name, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return True


@contextlib.contextmanager
def training_cpu_shims():
    """Install the ``megatron.training`` shims 8-17 above; undo them on exit, even on error.

    Use inside ``cpu_shims()``, with the checkout's ``megatron`` first on ``sys.path``."""
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    from megatron.core.models.bert import bert_layer_specs
    from megatron.legacy import fused_kernels

    with contextlib.ExitStack() as stack:
        patch = lambda obj, name, value: stack.enter_context(_setattr(obj, name, value))
        init = training.initialize_megatron  # 8
        patch(training, "initialize_megatron",
              lambda *a, **k: init(*a, **dict(k, allow_no_cuda=True)))
        patch(torch.cuda, "device_count", lambda: 1)  # 9
        patch(torch.cuda, "set_device", lambda *a, **k: None)
        if _prebuilt_dataset_helpers():  # 12, on every rank: only rank 0 calls compile_helpers
            stack.callback(sys.modules.pop, "megatron.core.datasets.helpers_cpp", None)
        patch(dataset_utils, "compile_helpers", _prebuilt_dataset_helpers)
        patch(fused_kernels, "load", lambda *a, **k: None)  # 13
        patch(initialize, "_warmup_jit_function", lambda *a, **k: None)  # 14
        patch(arguments, "get_device_arch_version", lambda: 9)  # 15
        patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())  # 16
        patch(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
        te_spec = "bert_layer_with_transformer_engine_spec"  # 16, only without TE
        if te_spec not in vars(bert_layer_specs) and not _has_module("transformer_engine"):
            from megatron.core.transformer.spec_utils import ModuleSpec

            setattr(bert_layer_specs, te_spec, ModuleSpec(module=_needs_transformer_engine))
            stack.callback(delattr, bert_layer_specs, te_spec)
        stack.enter_context(CudaToCpu())  # 10
        yield
