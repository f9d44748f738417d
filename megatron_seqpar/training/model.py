"""megatron-core ``GPTModel`` / ``BertModel`` with our layer specs, wrapped in Megatron's DDP.

Spec: ``megatron_seqpar.specs.get_gpt_layer_spec(method, options=...)`` /
``get_bert_layer_spec(...)`` when ``--seqpar-method`` is given, else megatron-core's own local
spec (``get_gpt_layer_local_spec()`` / ``bert_layer_local_spec``; CP=1 only).

Gradient reduction: megatron-core ``DistributedDataParallel`` over the data x context group
(``finalize_model_grads``), or for LSS ``lss_ddp`` + ``lss_finalize_model_grads`` (double
gradient averaging: sequence group, then data-parallel group; docs/design.md §5; position-embedding
gradients assembled over CP unless ``assemble_position_grads`` is off).

RoPE under ``--seqpar-packing balanced``: the model is built with ``position_embedding_type="none"``
and our core attention rotates q and k (``megatron_seqpar.megatron.rope``).

BERT under CP: megatron-core's ``BertModel`` derives position ids as ``arange(local length)``;
``megatron_seqpar.megatron.bert.SeqParBertModel`` gives global zigzag positions instead.
"""

from __future__ import annotations

import torch

from megatron_seqpar import specs
from megatron_seqpar.megatron.bert import SeqParBertModel
from megatron_seqpar.megatron.lss_grad import (
    install_lss_grad_averaging,
    lss_ddp,
    lss_finalize_model_grads,
)
from megatron_seqpar.megatron.rope import DocumentRope


def transformer_config(cfg, device: str):
    """megatron-core ``TransformerConfig`` for ``cfg``."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dtype = torch.bfloat16 if cfg.bf16 else torch.float64 if cfg.fp64 else torch.float32
    mla = {}
    if cfg.multi_latent_attention:  # its own RoPE on the qk_pos_emb_head_dim part
        mla = dict(multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank,
                   kv_lora_rank=cfg.kv_lora_rank, qk_head_dim=cfg.qk_head_dim,
                   qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim,
                   rope_type="rope")
    return (MLATransformerConfig if mla else TransformerConfig)(
        **mla,
        window_size=cfg.window_size, window_attn_skip_freq=cfg.window_attn_skip_freq,
        softmax_type=cfg.softmax_type,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        hierarchical_context_parallel_sizes=(  # two levels: the provider reads U from here
            list(cfg.hierarchical_context_parallel_sizes)
            if cfg.hierarchical_context_parallel_sizes else None),
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        use_cpu_initialization=device == "cpu",
        bf16=cfg.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        calculate_per_token_loss=False,
    )


def layer_spec(cfg):
    """The transformer-layer ``ModuleSpec``: ours for an active ``--seqpar-method``, else
    Megatron's (also for a method inactive at CP=1)."""
    if cfg.attention_method is not None:
        if cfg.model == "gpt":
            rope = DocumentRope() if cfg.rope_in_provider else None  # GPTModel's defaults
            return specs.get_gpt_layer_spec(cfg.attention_method, options=cfg.method_options(),
                                            multi_latent_attention=cfg.multi_latent_attention,
                                            rope=rope)
        return specs.get_bert_layer_spec(cfg.attention_method, options=cfg.method_options())
    if cfg.model == "gpt":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec()
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec

    return bert_layer_local_spec


def _bert_class(cfg):
    if cfg.attention_method is None:  # megatron-core's own BertModel (CP=1)
        from megatron.core.models.bert.bert_model import BertModel

        return BertModel
    return SeqParBertModel


def seed_rngs(seed: int, device: str) -> None:
    """Seed what a model build draws from: torch's default generator and, on CUDA,
    megatron-core's CUDA RNG tracker (``model_parallel_cuda_manual_seed``, as Megatron-LM's
    ``_set_random_seed`` does). On CUDA the weights are initialised on the device
    (``use_cpu_initialization=False``) inside ``get_cuda_rng_tracker().fork()``, which raises
    "cuda rng state model-parallel-rng is not added" unless the tracker was seeded. Needs
    megatron-core's parallel state (the TP/EP ranks pick the per-rank seeds)."""
    torch.manual_seed(seed)
    if device == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(cfg, device: str):
    """(DDP-wrapped model, TransformerConfig, finalize_grads_fn), its weights drawn after
    ``seed_rngs(cfg.seed, device)``: the same on every rank and for every CP size."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    seed_rngs(cfg.seed, device)
    config = transformer_config(cfg, device)
    spec = layer_spec(cfg)
    max_pos = cfg.max_position_embeddings or cfg.seq_length
    tied = not cfg.untie_embeddings_and_output_weights
    if cfg.model == "gpt":
        from megatron.core.models.gpt import GPTModel

        module = GPTModel(  # RoPE in our provider: megatron-core's off (megatron.rope)
            config=config, transformer_layer_spec=spec, vocab_size=cfg_vocab(cfg),
            max_sequence_length=max_pos, share_embeddings_and_output_weights=tied,
            position_embedding_type="none" if cfg.rope_in_provider
            else cfg.position_embedding_type,
        )
    else:
        module = _bert_class(cfg)(
            config=config, num_tokentypes=0, transformer_layer_spec=spec,
            vocab_size=cfg_vocab(cfg), max_sequence_length=max_pos,
            share_embeddings_and_output_weights=tied, add_binary_head=False,
            position_embedding_type=cfg.position_embedding_type,
        )
    if cfg.bf16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(config, module)
    if cfg.fp64:  # megatron-core's torch norms ignore params_dtype
        module.double()
    module.to(device)
    # fp32 grad buffers (Megatron's choice for bf16); with --fp64 they keep float64
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not cfg.fp64, use_distributed_optimizer=cfg.use_distributed_optimizer,
        num_distributed_optimizer_instances=cfg.optimizer_instances)
    lss = cfg.seqpar_method == "lss" and cfg.context_parallel_size > 1
    if lss and cfg.use_distributed_optimizer:  # Megatron's instances are the two levels
        model = DistributedDataParallel(config, ddp_config, module)
        install_lss_grad_averaging([model])  # checks the groups, re-points nothing
        finalize = finalize_model_grads
    elif lss:
        from megatron.core import parallel_state

        model = lss_ddp(config, ddp_config, module)
        finalize = lss_finalize_model_grads(
            parallel_state.get_context_parallel_group(),
            assemble_position_grads=cfg.method_options().assemble_position_grads)
    else:
        model = DistributedDataParallel(config, ddp_config, module)
        finalize = finalize_model_grads
    return model, config, finalize


def cfg_vocab(cfg) -> int:
    """Vocabulary size padded to a multiple of 128*TP, as Megatron-LM pads it (256 stays)."""
    m = 128 * cfg.tensor_model_parallel_size
    return -(-256 // m) * m


def unwrap(model):
    """The GPTModel/BertModel inside DDP (and Float16Module)."""
    while hasattr(model, "module"):
        model = model.module
    return model
