"""megatron-core glue: core-attention provider, CP/DP groups, LSS gradient averaging, remat.

Importing this subpackage imports megatron-core (``import megatron_seqpar`` alone does not).

- ``core_attention.SeqParCoreAttention``: drop-in for megatron-core's core attention.
- ``parallel_state``: the sequence (CP) and pure data-parallel groups from Megatron.
- ``lss_grad``: LSS double gradient averaging on megatron-core DDP grad buffers.
- ``checkpointing``: rematerialization-aware checkpointing (attention out + lse kept).
- ``bert.SeqParBertModel``: BertModel with global zigzag positions under CP.
- ``thd``: packed THD batches under CP without Transformer Engine (partitioned indices,
  ``get_thd_batch_on_this_cp_rank``).
- Layer specs: ``megatron_seqpar.specs``.
"""

from megatron_seqpar.megatron.core_attention import SeqParCoreAttention

__all__ = ["SeqParCoreAttention"]
