"""megatron-core transformer-layer specs that run attention with a sequence-parallel method.

Each spec starts from megatron-core's own layer spec (local or Transformer Engine) and swaps
exactly one field, ``submodules.self_attention.submodules.core_attention``, for
``ModuleSpec(SeqParCoreAttention, params={"method": ..., "options": ...})``; every other
submodule (linears, norms, MLP, bias-dropout-add) stays Megatron's.

    from megatron_seqpar.specs import gpt_lightseq          # a ModuleSpec
    GPTModel(config, transformer_layer_spec=gpt_lightseq, ...)

Megatron-LM: ``--spec megatron_seqpar.specs gpt_lightseq`` (or ``bert_rsa`` ...). Transformer
Engine variants (``gpt_te_<method>``, ``bert_te_<method>``) are built on first access and need
``transformer_engine``; the ``gpt_<method>``/``bert_<method>`` objects use local modules.

Importing this module imports megatron-core (``import megatron_seqpar`` alone does not).
"""

from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
from megatron_seqpar.registry import METHODS


def core_attention_spec(method: str, options=None, remat: bool | None = None,
                        rope=None) -> ModuleSpec:
    """``ModuleSpec`` of the provider for ``method``.

    ``options``: the method's frozen options (None = defaults). ``remat``: rematerialization-
    aware checkpointing (None = on exactly when Megatron recomputes attention). ``rope``: a
    ``megatron.rope.DocumentRope`` when the provider rotates q and k (balanced packing, with
    the model built without megatron-core's RoPE).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    params = {"method": method, "options": options}
    if remat is not None:
        params["remat"] = remat
    if rope is not None:
        params["rope"] = rope
    return ModuleSpec(module=SeqParCoreAttention, params=params)


def with_core_attention(layer_spec: ModuleSpec, method: str, options=None,
                        remat: bool | None = None, rope=None) -> ModuleSpec:
    """Copy of a TransformerLayer spec whose self-attention core is the ``method`` provider."""
    spec = copy.deepcopy(layer_spec)
    try:
        attn = spec.submodules.self_attention.submodules
        attn.core_attention  # noqa: B018 - probe the field
    except AttributeError as e:
        raise ValueError(
            "layer_spec has no submodules.self_attention.submodules.core_attention "
            "(is it a megatron-core TransformerLayer spec?)"
        ) from e
    attn.core_attention = core_attention_spec(method, options, remat, rope)
    return spec


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_gpt_layer_spec(method: str, *, options=None, remat: bool | None = None,
                       transformer_engine: bool = False, rope=None,
                       **megatron_kwargs) -> ModuleSpec:
    """GPT layer spec for ``method`` (``rope``: see ``core_attention_spec``).

    ``transformer_engine=False`` starts from ``get_gpt_layer_local_spec(**megatron_kwargs)``,
    True from ``get_gpt_layer_with_transformer_engine_spec(**megatron_kwargs)`` (needs TE).
    ``megatron_kwargs`` are those builders' own (``qk_layernorm``, ``normalization``,
    ``multi_latent_attention`` (MLA: its core attention gets ``k_channels``/``v_channels``),
    ...).
    """
    from megatron.core.models.gpt import gpt_layer_specs as g

    if transformer_engine:
        if not _have_te():
            raise ImportError("transformer_engine is not installed; use transformer_engine=False")
        base = g.get_gpt_layer_with_transformer_engine_spec(**megatron_kwargs)
    else:
        base = g.get_gpt_layer_local_spec(**megatron_kwargs)
    return with_core_attention(base, method, options, remat, rope)


def get_gpt_decoder_block_spec(method: str, config, *, options=None, remat: bool | None = None,
                               transformer_engine: bool = False, rope=None, **megatron_kwargs):
    """megatron-core's GPT decoder *block* spec (``get_gpt_decoder_block_spec(config, ...)``:
    MoE layers per ``config.num_experts`` / ``moe_layer_freq``, this pipeline stage's layers)
    with every layer's self-attention core the ``method`` provider. ``megatron_kwargs`` are
    that builder's own (``normalization``, ``qk_l2_norm``, ``vp_stage``, ``pp_rank``). The
    experts and router are Megatron's: the methods change only the core attention (``rope``:
    see ``core_attention_spec``)."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    if transformer_engine and not _have_te():
        raise ImportError("transformer_engine is not installed; use transformer_engine=False")
    block = copy.copy(g.get_gpt_decoder_block_spec(
        config, use_transformer_engine=transformer_engine, **megatron_kwargs))
    block.layer_specs = [with_core_attention(spec, method, options, remat, rope)
                         for spec in block.layer_specs]
    return block


def get_bert_layer_spec(method: str, *, options=None, remat: bool | None = None,
                        transformer_engine: bool = False) -> ModuleSpec:
    """BERT layer spec for ``method`` (padding mask), from megatron-core's local or TE spec.

    Use it with ``megatron_seqpar.megatron.bert.SeqParBertModel`` under CP>1: stock
    ``BertModel`` derives local position ids and a local-only mask.
    """
    from megatron.core.models.bert import bert_layer_specs as bl

    if transformer_engine:
        if not _have_te():
            raise ImportError("transformer_engine is not installed; use transformer_engine=False")
        base = bl.get_bert_layer_with_transformer_engine_spec()
    else:
        base = bl.bert_layer_local_spec
    return with_core_attention(base, method, options, remat)


# gpt_<method> / bert_<method>: local-module specs, one pair per registered method
_LOCAL = {f"{model}_{m}": build(m) for m in METHODS
          for model, build in (("gpt", get_gpt_layer_spec), ("bert", get_bert_layer_spec))}
globals().update(_LOCAL)

_TE_NAMES = {f"{model}_te_{m}": (model, m) for model in ("gpt", "bert") for m in METHODS}


def __getattr__(name: str):
    """``gpt_te_<method>`` / ``bert_te_<method>``: built lazily, only with transformer_engine.

    The spec is cached in the module's namespace: Megatron-LM's ``--spec MODULE NAME`` does
    ``__import__(MODULE, fromlist=[NAME])`` (whose ``hasattr`` lands here) and then reads
    ``vars(module)[NAME]``.
    """
    if name in _TE_NAMES:
        model, method = _TE_NAMES[name]
        build = get_gpt_layer_spec if model == "gpt" else get_bert_layer_spec
        spec = globals()[name] = build(method, transformer_engine=True)
        return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["core_attention_spec", "get_bert_layer_spec", "get_gpt_layer_spec",
           "with_core_attention", *sorted(_LOCAL)]
