"""``BertModel`` that is correct under context parallelism (megatron-core's is not).

megatron-core 0.16.1's ``BertModel`` has no CP support: it numbers positions
``arange(local length)``, builds the attention mask from the local shard as if it were the
whole sequence, and pools token 0, which only CP rank 0 holds. ``SeqParBertModel`` fixes the
three without touching Megatron:

* position ids are the *global* positions of this rank's zigzag chunks (r and 2P-1-r), so the
  learned position table and RoPE see the same positions as a CP=1 run;
* the padding mask is passed as a ``[b, 1, 1, s]`` key mask (True = padded) and the
  ``SeqParCoreAttention`` provider's method gathers every rank's key padding, so each query
  sees the padding of *all* keys; ``attention_mask`` may be given for the local shard
  ``[b, s]`` or for the full sequence ``[b, P*s]`` (then it is cut to this rank's chunks);
* the pooler (binary head) gets token 0's final hidden state broadcast from CP rank 0
  (one broadcast of ``b·h`` elements forward, one all-reduce of the same backward), so every
  CP rank computes the same binary logits. A loss that adds the binary loss on every CP rank
  must weight it by ``1/P`` (the language-model loss is a per-token sum and needs nothing);
* ``pg_collection`` reaches the attention: megatron-core 0.16.1's ``BertModel`` does not pass
  it to its ``TransformerBlock`` (whose layers then read ``parallel_state``), so the
  ``SeqParCoreAttention`` providers inside are re-pointed to ``pg_collection.cp`` and, with
  two levels, to ``pg_collection.hcp`` (``parallel_state.two_level_groups``). No collective.

Use with ``megatron_seqpar.specs.get_bert_layer_spec(method)`` (``bert_<method>``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.bert.bert_model import BertModel

from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
from megatron_seqpar.megatron.parallel_state import sequence_group, two_level_groups


class _BroadcastFromFirst(torch.autograd.Function):
    """Forward: rank 0 of ``group``'s tensor on every rank. Backward: sum to rank 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.detach().clone().contiguous()
        dist.broadcast(y, src=dist.get_global_rank(group, 0), group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        g = dy.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        if dist.get_rank(ctx.group) != 0:
            g.zero_()
        return g, None


def zigzag_positions(local_len: int, cp_rank: int, cp_size: int,
                     device=None) -> torch.Tensor:
    """Global positions of this rank's ``local_len`` tokens in the zigzag layout."""
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    if local_len % 2:
        raise ValueError(f"zigzag needs an even local length, got {local_len}")
    c = local_len // 2
    a, b = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device),
                      torch.arange(b * c, (b + 1) * c, device=device)])


def _is_ours(layer_spec) -> bool:
    core = layer_spec.submodules.self_attention.submodules.core_attention
    return getattr(core, "module", core) is SeqParCoreAttention


class SeqParBertModel(BertModel):
    """``BertModel`` with global zigzag positions, all-key padding and CP-aware pooling.

    Same constructor and forward as ``BertModel``. The CP group is ``pg_collection.cp`` or
    ``parallel_state``'s. Collectives: the attention method's, plus the pooler broadcast.
    """

    def __init__(self, *args, pg_collection=None, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self.cp_group = sequence_group(pg_collection)
        if pg_collection is not None:
            self._use_groups_of(pg_collection)
        if getattr(self, "pooler", None) is not None and self.cp_group.size() > 1:
            self.pooler.register_forward_pre_hook(self._first_token_from_cp_rank0)

    def _use_groups_of(self, pg_collection) -> None:
        for m in self.modules():
            if isinstance(m, SeqParCoreAttention):
                m.cp_group = self.cp_group
                u = m.options.head_parallel if m.options is not None else 1
                m.two_level_groups = two_level_groups(pg_collection, u) if u > 1 else None

    def _first_token_from_cp_rank0(self, _module, args):
        hidden, index = args[0], args[1] if len(args) > 1 else 0
        token = _BroadcastFromFirst.apply(hidden[index : index + 1], self.cp_group)
        return (token, 0)

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        if _is_ours(self.transformer_layer_spec):
            return "b11s"  # the provider wants key padding only
        return super()._sanity_check_attention_and_get_attn_mask_dimension()

    def bert_position_ids(self, token_ids):
        s = token_ids.size(1)
        pos = zigzag_positions(s, self.cp_group.rank(), self.cp_group.size(), token_ids.device)
        return pos.unsqueeze(0).expand_as(token_ids)

    def forward(self, input_ids, attention_mask, *args, **kwargs):
        p, s = self.cp_group.size(), input_ids.size(1)
        if p > 1 and attention_mask.size(-1) == p * s:  # full-length mask: keep my chunks
            idx = zigzag_positions(s, self.cp_group.rank(), p, attention_mask.device)
            attention_mask = attention_mask.index_select(-1, idx)
        return super().forward(input_ids, attention_mask, *args, **kwargs)
