"""Megatron-LM glue: ``--seqpar-method`` flags, their validation, and the layer spec they select.

Megatron-LM's ``pretrain_gpt.py`` / ``pretrain_bert.py`` call ``pretrain(...,
extra_args_provider=...)``; the patches in ``patches/`` (applied by
``tools/megatron_lm_patches.py``) pass ``extra_args_provider`` from here and route model
building and the forward step through the helpers below. Unpatched, only
``--spec megatron_seqpar.specs gpt_<method>`` works (default options, stock gradient reduction).

Flags (one definition, ``add_seqpar_args``, shared with our own ``examples/`` drivers), built
from the methods' frozen ``Options`` dataclasses:

    --seqpar-method {rsa,mqsp,lss,lightseq}    attention on the context-parallel axis
    --seqpar-backend NAME                      block-kernel backend (every method)
    --seqpar-<method>-<field> VALUE            a method's own option, e.g. --seqpar-mqsp-micro-q 4
    --[no-]seqpar-<method>-<bool field>        e.g. --no-seqpar-lightseq-balance

An option flag left out keeps the dataclass default; a flag of another method is an error.

What the patched scripts call: ``extra_args_provider`` / ``chain_args_providers`` (flags),
``gpt_layer_spec_from_args`` / ``bert_layer_spec_from_args`` (validate, then our spec),
``position_embedding_type`` (the GPT builder's: ``"none"`` when our provider rotates RoPE),
``wrap_forward_step`` (LSS: ``install_lss_grad_averaging`` on the DDP chunks at the first
step), and for BERT ``bert_model_class``, ``bert_batch_on_this_cp_rank``, ``bert_lm_loss``,
``bert_binary_loss`` (CP sharding and CP-exact losses), and for GPT with
``--reset-attention-mask`` ``packs_documents`` / ``document_batch_on_this_cp_rank`` (documents
packed into a THD stream with cu_seqlens instead of a dense mask).
``validate_seqpar_args(args)`` runs after Megatron's own ``validate_args`` (the patched model
builders call it) and raises ``SeqParArgumentError`` naming the fix. Nothing here runs a
collective or changes Megatron at import time; the flags themselves are defined in
``megatron_seqpar.flags`` and their rules in ``megatron_seqpar.flag_rules``.
"""

from __future__ import annotations

import argparse
import enum
import functools
import importlib
import importlib.util
import os

import torch
import torch.distributed as dist

from megatron_seqpar import flag_rules
from megatron_seqpar.flags import (  # noqa: F401  (the patched scripts' names, re-exported)
    GROUP_TITLE,
    SeqParArgumentError,
    add_seqpar_args,
    option_flags,
    options_from_args,
)
from megatron_seqpar.layouts import shard_sequence
from megatron_seqpar.megatron import lss_grad
from megatron_seqpar.megatron.parallel_state import sequence_group
from megatron_seqpar.megatron.rope import DocumentRope
from megatron_seqpar.megatron.thd import packed_seq_params
from megatron_seqpar.specs import (
    get_bert_layer_spec,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
)
from megatron_seqpar.training.data import pack_documents

BERT_MODEL = "megatron_seqpar.megatron.bert:SeqParBertModel"  # the CP-aware BertModel
LSS_INSTALLED_LOG = "megatron-seqpar: LSS double gradient averaging installed"
CHECKPOINT_LOG = "megatron-seqpar: checkpoint"
TWO_LEVEL_LOG = "megatron-seqpar: two levels"
INACTIVE_LOG = flag_rules.INACTIVE_LOG


def extra_args_provider(parser):
    """Megatron-LM ``extra_args_provider``: ``parser -> parser`` with the ``--seqpar-*`` flags."""
    return add_seqpar_args(parser)


def chain_args_providers(*providers):
    """One ``extra_args_provider`` running each non-None provider in turn (e.g. ModelOpt's)."""
    live = [p for p in providers if p is not None]

    def provider(parser):
        for p in live:
            parser = p(parser)
        return parser

    return provider


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def seqpar_conflicts(args, *, model: str = "gpt") -> list[str]:
    """Every reason the parsed Megatron-LM ``args`` cannot run ``--seqpar-method`` (fix named):
    the rules of ``megatron_seqpar.flag_rules`` for this route, all of them.

    Empty without ``--seqpar-method``. Missing attributes take Megatron-LM's defaults, so a
    namespace from another parser (our ``examples/``) works too.
    """
    given = {"head_parallel": getattr(args, "seqpar_head_parallel", None),
             "assemble_position_grads": getattr(args, "seqpar_lss_assemble_position_grads",
                                                None)}
    installed = frozenset(m for m in ("transformer_engine", "apex",
                                      "fused_weight_gradient_mlp_cuda") if _has_module(m))
    return flag_rules.check_all(flag_rules.View(
        flag_rules.MEGATRON_LM, model, args, {k: x for k, x in given.items() if x is not None},
        installed))


def validate_seqpar_args(args, *, model: str = "gpt"):
    """Check the ``--seqpar-*`` flags against the rest; returns the method's ``Options``.

    Run it after Megatron-LM's ``validate_args`` (the patched builders do, on every rank,
    before any layer is built). Raises ``SeqParArgumentError`` listing every conflict.
    """
    if model not in ("gpt", "bert"):
        raise ValueError(f"model must be 'gpt' or 'bert', got {model!r}")
    options = options_from_args(args)
    problems = seqpar_conflicts(args, model=model)
    if problems:
        raise SeqParArgumentError("megatron-seqpar: " + "\n  ".join(problems))
    return options


def gpt_layer_spec_from_args(args, config=None, vp_stage=None):
    """Our GPT layer spec for Megatron-LM ``args`` (validated first).

    ``--transformer-impl transformer_engine`` starts from megatron-core's TE layer spec,
    ``local`` from the local one (honouring ``--normalization``, ``--qk-layernorm``). With
    ``--num-experts`` it is Megatron-LM's MoE decoder block spec for ``config`` and
    ``vp_stage`` (``specs.get_gpt_decoder_block_spec``), our core attention in every layer.
    """

    options = validate_seqpar_args(args, model="gpt")
    te = args.transformer_impl == "transformer_engine"
    if getattr(args, "num_experts", None):
        return _moe_block_spec(args, config, vp_stage, options, te)
    kwargs = {"qk_layernorm": getattr(args, "qk_layernorm", False),
              "qk_l2_norm": getattr(args, "qk_l2_norm", False),
              "multi_latent_attention": bool(getattr(args, "multi_latent_attention", False))}
    if not te:
        kwargs["normalization"] = getattr(args, "normalization", None)
    if not flag_rules.method_active(args):
        _note_inactive(args)
        from megatron.core.models.gpt import gpt_layer_specs as g

        build = (g.get_gpt_layer_with_transformer_engine_spec if te
                 else g.get_gpt_layer_local_spec)
        return build(**kwargs)
    _note_two_level(args)
    if args.context_parallel_size == 1:
        _print_rank_0(f"{INACTIVE_LOG}: CP=1 with --multi-latent-attention: our provider runs "
                      "MLA as plain local attention (megatron-core's takes no V head dim)")
    return get_gpt_layer_spec(args.seqpar_method, options=options, transformer_engine=te,
                              rope=_document_rope(args), **kwargs)


def _moe_block_spec(args, config, vp_stage, options, te):
    kwargs = {"normalization": getattr(args, "normalization", None),
              "qk_l2_norm": getattr(args, "qk_l2_norm", False), "vp_stage": vp_stage}
    if not flag_rules.method_active(args):
        _note_inactive(args)
        from megatron.core.models.gpt import gpt_layer_specs as g

        return g.get_gpt_decoder_block_spec(config, use_transformer_engine=te, **kwargs)
    _note_two_level(args)
    return get_gpt_decoder_block_spec(args.seqpar_method, config, options=options,
                                      transformer_engine=te, rope=_document_rope(args),
                                      **kwargs)


def _rope_in_provider(args) -> bool:
    return flag_rules.method_active(args) and flag_rules.rope_in_provider(args)


def _document_rope(args) -> DocumentRope | None:
    """The RoPE settings Megatron-LM's GPT builder gives ``GPTModel``, for our provider to
    rotate with (``megatron.rope``), when it does; else None."""
    if not _rope_in_provider(args):
        return None
    return DocumentRope(rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
                        rope_scaling=bool(getattr(args, "use_rope_scaling", False)))


def position_embedding_type(args) -> str:
    """What the patched GPT builder passes ``GPTModel``: ``"none"`` when our provider rotates
    (RoPE under ``--seqpar-packing balanced``: megatron-core's THD rotation assumes zigzag),
    else ``args.position_embedding_type``."""
    return "none" if _rope_in_provider(args) else args.position_embedding_type


def bert_layer_spec_from_args(args):
    """Our BERT layer spec for Megatron-LM ``args`` (validated first)."""

    options = validate_seqpar_args(args, model="bert")
    te = args.transformer_impl == "transformer_engine"
    if not flag_rules.method_active(args):
        _note_inactive(args)
        from megatron.core.models.bert import bert_layer_specs as bl

        return bl.get_bert_layer_with_transformer_engine_spec() if te else \
            bl.bert_layer_local_spec
    _note_two_level(args)
    return get_bert_layer_spec(args.seqpar_method, options=options, transformer_engine=te)


def _note_inactive(args) -> None:
    """Rank 0 prints ``INACTIVE_LOG``: the method does nothing at CP=1."""
    _print_rank_0(flag_rules.inactive_note(args.seqpar_method,
                                           "plain Megatron-LM with its local attention"))


def _note_two_level(args) -> None:
    """Rank 0 prints ``TWO_LEVEL_LOG`` when ``--hierarchical-context-parallel-sizes U R`` is
    set: the provider then reads U from the TransformerConfig and the groups from
    megatron-core's hierarchical CP groups (``megatron.parallel_state.two_level_groups``)."""
    hcp = getattr(args, "hierarchical_context_parallel_sizes", None)
    if hcp:
        _print_rank_0(f"{TWO_LEVEL_LOG}: head all-to-all inside groups of U={hcp[0]} "
                      f"consecutive CP ranks, --seqpar-method {args.seqpar_method} across "
                      f"R={hcp[1]} groups (megatron-core's hierarchical CP groups)")


def bert_model_class(args):
    """megatron-core ``BertModel``, or with ``--seqpar-method`` the CP-aware subclass (global
    position ids, padding mask of the whole sequence)."""

    if not flag_rules.method_active(args):
        from megatron.core.models.bert.bert_model import BertModel

        return BertModel
    module, name = BERT_MODEL.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"{BERT_MODEL} is not available ({e}); megatron-core's BertModel "
                          "derives local position ids and cannot run under CP > 1") from None


def install_lss_grad_averaging(model_chunks, *, assemble_position_grads: bool = True) -> None:
    """LSS double gradient averaging on Megatron-LM's DDP ``model_chunks`` (the one call site).

    Megatron-LM builds the DDP chunks itself (reducing over DP x CP) and sets
    ``config.finalize_model_grads_func`` just before its training loop, so this runs from the
    first forward step (``wrap_forward_step``), after both. It defers to
    ``megatron_seqpar.megatron.lss_grad.install_lss_grad_averaging`` (groups from
    ``parallel_state``): bucket reduction over pure DP, CP average in finalize.
    ``assemble_position_grads`` (``--[no-]seqpar-lss-assemble-position-grads``, default on)
    keeps Megatron's clipping and checkpoints exact; off (rows owned per segment) is exact on
    this route only with ``--clip-grad 0`` and without resuming. Rank 0 prints
    ``LSS_INSTALLED_LOG`` with the group sizes, the finalize function now in place and the
    position-embedding mode.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    lss_grad.install_lss_grad_averaging(chunks, assemble_position_grads=assemble_position_grads)
    cp, dp = (parallel_state.get_context_parallel_world_size(),
              parallel_state.get_data_parallel_world_size())
    if chunks[0].ddp_config.use_distributed_optimizer:
        _print_rank_0(
            f"{LSS_INSTALLED_LOG}: CP={cp} reduce-scatter in each distributed-optimizer "
            f"instance (the CP group), then the shard all-reduced over DP={dp} across "
            "instances; position-embedding gradients assembled over CP")
        return
    finalize = get_model_config(chunks[0]).finalize_model_grads_func
    rows = ("assembled over CP" if assemble_position_grads else
            "owned per segment (exact only with --clip-grad 0, not resumable)")
    _print_rank_0(
        f"{LSS_INSTALLED_LOG}: CP={cp} average in {getattr(finalize, '__qualname__', finalize)}, "
        f"then DDP buckets over DP={dp}; position-embedding gradients {rows}")


def _print_rank_0(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def _args_globals(path: str) -> list:
    """What a safe load of a checkpoint's ``common.pt`` may construct besides plain data:
    ``argparse.Namespace`` (Megatron-LM's saved ``args``) and the ``Enum`` classes of
    ``megatron.*`` it names (``args.attention_backend`` and kin; an enum is rebuilt from its
    value, which runs no code). The names are read from the file without unpickling it; one of
    another module is never imported (``weights_only`` then refuses the file)."""
    allowed = [argparse.Namespace]
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module, _, attr = name.rpartition(".")
        if not module.startswith("megatron."):
            continue
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            allowed.append(obj)
    return allowed


def loaded_checkpoint_note(args) -> str | None:
    """One line on the checkpoint ``--load`` resumed: the ``--seqpar-method`` and CP size it was
    saved with against this run's (the methods add no parameters, so any method loads any
    other's checkpoint). None without ``--load`` or a checkpoint there. Reads the tracker file
    and the ``torch_dist`` checkpoint's ``common.pt`` (its saved ``args``) with
    ``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` and Megatron's enums only
    (``_args_globals``): a file holding anything else (a crafted pickle) is not read, and the
    line says so; no collective.
    """

    load = getattr(args, "load", None)
    tracker = os.path.join(load or "", "latest_checkpointed_iteration.txt")
    if not load or not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    step = getattr(args, "ckpt_step", None)
    name = "release" if text == "release" and step is None else f"iter_{int(step or text):07d}"
    here = (getattr(args, "seqpar_method", None), getattr(args, "context_parallel_size", 1))
    saved = None
    common = os.path.join(load, name, "common.pt")
    if os.path.isfile(common):
        try:  # never unpickle code: plain data, argparse.Namespace and Megatron's enums only
            with torch.serialization.safe_globals(_args_globals(common)):
                old = torch.load(common, map_location="cpu", weights_only=True).get("args")
        except Exception as e:  # noqa: BLE001 - refused, not run: say so in one line
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            return (f"{CHECKPOINT_LOG}: {common} holds objects a safe load refuses ({reason}); "
                    "its --seqpar-method is not read (nothing in it was executed)")
        if old is not None:
            saved = (getattr(old, "seqpar_method", None), getattr(old, "context_parallel_size", 1))

    def say(method, cp):
        return f"--seqpar-method {method} (CP={cp})" if method else f"no --seqpar-method (CP={cp})"

    where = os.path.join(load, name)
    if saved is None:
        return f"{CHECKPOINT_LOG}: {where} (its --seqpar-method is not recorded) into {say(*here)}"
    if saved[0] == here[0]:
        return f"{CHECKPOINT_LOG}: {where} saved with {say(*saved)}, resumed with the same method"
    return (f"{CHECKPOINT_LOG}: {where} saved with {say(*saved)}, loaded into {say(*here)}: a "
            "different method; the methods add no parameters, so weights and optimizer state "
            "carry over unchanged")


def wrap_forward_step(forward_step):
    """Megatron-LM ``forward_step`` that, for ``--seqpar-method lss``, installs double
    gradient averaging on each model chunk the first time the chunk is seen, and at the first
    step after ``--load`` prints ``loaded_checkpoint_note`` (rank 0)."""

    @functools.wraps(forward_step)
    def step(data_iterator, model, *args, **kwargs):
        if not getattr(model, "_seqpar_lss_checked", False):
            from megatron.training import get_args

            margs = get_args()
            if margs.seqpar_method == "lss" and flag_rules.method_active(margs):
                install_lss_grad_averaging([model], assemble_position_grads=options_from_args(
                    margs).assemble_position_grads)
            if not getattr(step, "_checkpoint_noted", False):
                step._checkpoint_noted = True
                note = loaded_checkpoint_note(margs)
                if note:
                    _print_rank_0(note)
            model._seqpar_lss_checked = True
        return forward_step(data_iterator, model, *args, **kwargs)

    return step


def packs_documents(args) -> bool:
    """True when the patched ``pretrain_gpt.py`` turns documents into a THD stream:
    ``--seqpar-method`` with ``--reset-attention-mask``."""
    return flag_rules.method_active(args) and bool(getattr(args, "reset_attention_mask", False))


DOCUMENT_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def document_batch_on_this_cp_rank(batch: dict, eod: int | None = None,
                                   layout: str = "zigzag"):
    """``(batch, PackedSeqParams)``: the patched ``pretrain_gpt.get_batch`` with
    ``--reset-attention-mask`` (``packs_documents``), in place of ``get_batch_on_this_cp_rank``.

    ``batch``: ``get_batch_on_this_tp_rank``'s full-sequence GPT tensors ``[b, S]`` (loss mask
    and position ids already Megatron's, from ``--eod-mask-loss`` / ``--reset-position-ids``;
    ``attention_mask`` None). The ``b`` rows become one stream ``[1, T]``, each document piece
    (cut after every EOD, ``eod`` defaulting to the tokenizer's) padded to a multiple of 2*CP
    with loss-masked pads (``megatron_seqpar.training.data.pack_documents``), then this CP
    rank's zigzag share of every sequence (Transformer Engine's THD partitioning, through
    ``shard_sequence(..., cu_seqlens=)``; no TE needed). ``layout="balanced"``
    (``--seqpar-packing balanced``): no per-document padding, this rank's share of the
    balanced layout (``megatron_seqpar.balance``). Returns the same keys in the same
    order (``attention_mask`` None) and ``PackedSeqParams(qkv_format="thd")`` (for balanced
    ``thd.SeqParPackedSeqParams``, which says the layout) with global ``cu_seqlens_q`` (real
    lengths) and ``cu_seqlens_q_padded``. No collective; the dense
    ``S x S`` mask is never built. Megatron-LM divides each CP rank's loss by that rank's own
    token count unless ``--calculate-per-token-loss``; pass it for the CP=1 gradient.
    """
    from megatron.core import parallel_state

    if set(batch) != set(DOCUMENT_KEYS):
        raise ValueError(f"--reset-attention-mask with --seqpar-method packs a GPT batch of "
                         f"{DOCUMENT_KEYS}, got {tuple(batch)}; drop the options that add the "
                         "others (e.g. --mtp-num-layers)")
    if batch["attention_mask"] is not None:
        raise ValueError("--reset-attention-mask with --seqpar-method: the data loader built a "
                         "dense attention mask; pass --no-create-attention-mask-in-dataloader")
    if eod is None:
        from megatron.training import get_tokenizer

        eod = get_tokenizer().eod
    group = parallel_state.get_context_parallel_group()
    cp = group.size()
    packed = pack_documents({k: batch[k] for k in DOCUMENT_KEYS if k != "attention_mask"},
                            eod=eod, unit=flag_rules.least_document_multiple(cp, layout),
                            stream_multiple=cp)
    device = batch["tokens"].device
    cu = packed.pop("cu_seqlens").to(device)
    cu_pad = packed.pop("cu_seqlens_padded").to(device)
    longest = int(packed.pop("max_seqlen")[0])
    out = {}
    for key in batch:
        x = packed.get(key)
        if x is not None and cp > 1:
            x = shard_sequence(x, dim=1, group=group, layout=layout, cu_seqlens=cu_pad)
        out[key] = x
    return out, packed_seq_params(cu, cu_pad, longest, layout)


def bert_batch_on_this_cp_rank(tokens, types, loss_mask, lm_labels, padding_mask):
    """This CP rank's zigzag slice (dim 1) of BERT's per-token tensors; unchanged at CP=1."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = get_batch_on_this_cp_rank({"tokens": tokens, "types": types, "loss_mask": loss_mask,
                                       "lm_labels": lm_labels, "padding_mask": padding_mask})
    return (batch["tokens"], batch["types"], batch["loss_mask"], batch["lm_labels"],
            batch["padding_mask"])


def bert_lm_loss(lm_loss_, loss_mask):
    """Masked-LM loss under CP: the value is the whole sequence's mean, the gradient flows
    through this rank's tokens only (divided by the global token count).

    Megatron multiplies a 2-tuple loss by the CP size and DDP averages over DP x CP, so this
    gives the single-process gradient. Collective: one all-reduce of 2 floats over CP.
    """

    local = torch.sum(lm_loss_.view(-1) * loss_mask.reshape(-1).to(lm_loss_.dtype))
    group = sequence_group()
    if dist.get_world_size(group) == 1:
        return local / loss_mask.sum()
    both = torch.stack([local.detach(), loss_mask.sum().to(local.dtype)])
    dist.all_reduce(both, group=group)
    mine = local / both[1]
    return mine + (both[0] / both[1] - mine.detach())


def bert_binary_loss(sop_loss):
    """Sentence-order loss under CP: same value, gradient weighted ``1/P``.

    ``SeqParBertModel`` gives every CP rank the same binary logits (token 0 broadcast from CP
    rank 0), so each of the P ranks adds the same loss; weighting its gradient by ``1/P``
    keeps the sum equal to the single-process gradient. No collective.
    """

    p = dist.get_world_size(sequence_group())
    if p == 1:
        return sop_loss
    return sop_loss / p + (sop_loss - sop_loss / p).detach()
