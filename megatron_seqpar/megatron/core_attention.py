"""megatron-core core-attention provider running one of the exact sequence-parallel methods.

``SeqParCoreAttention`` is a drop-in for ``megatron.core.transformer.dot_product_attention.
DotProductAttention`` (same constructor keywords, same forward signature, same shapes): it
goes into ``spec.submodules.self_attention.submodules.core_attention`` through a
``ModuleSpec(module=SeqParCoreAttention, params={"method": ...})`` (see ``megatron_seqpar.specs``).

Inside Megatron the sequence is sharded over the *context-parallel* group in the zigzag layout
that ``megatron.core.utils.get_batch_on_this_cp_rank`` and RoPE's
``get_pos_emb_on_this_cp_rank`` produce (2P chunks, rank r holds chunks r and 2P-1-r), so the
provider calls ``msp.attention(..., group=cp_group, layout="zigzag")``.

Collectives and memory are those of the chosen method (``msp.attention`` docstrings and
docs/design.md §4), run on the CP group of this TP rank; the provider itself adds none. With
CP=1 the method runs on a group of one and degenerates to local attention.

Megatron semantics kept:
  * ``softmax_scale`` defaults to ``1/sqrt(hn)`` (or ``config.softmax_scale``);
    ``apply_query_key_layer_scaling`` divides the scores by ``layer_number`` and multiplies
    them back inside an fp32 softmax, so the effective scale is unchanged; the methods always
    accumulate and merge in fp32, which is what ``attention_softmax_in_fp32`` asks for.
  * GQA: query head ``i`` uses kv head ``i // (np // ng)`` (Megatron's ``repeat_interleave``).
  * Masks: ``causal`` ignores ``attention_mask`` (as TE does; the causal mask follows global
    token positions); ``padding`` / ``padding_causal`` take a bool mask, True = masked, of shape
    ``[b, 1, 1, sk]`` or ``[b, 1, sq, sk]`` whose key axis is either this rank's shard
    (``sk == sq``) or the full sequence (``sk == P*sq``, as ``get_batch_on_this_cp_rank`` leaves
    it); only key padding (optionally with the matching padded query rows) is representable.
    Padded query rows return zeros (Megatron's local softmax returns a uniform row there: both
    are outputs of padded tokens and never reach an unmasked loss term).

Packed sequences: ``packed_seq_params=PackedSeqParams(qkv_format="thd")`` (q ``[t, np, hn]``,
this rank's tokens in Transformer Engine's THD partitioning, which
``megatron_seqpar.megatron.thd.get_thd_batch_on_this_cp_rank`` produces without TE) runs the
method with ``cu_seqlens`` = ``cu_seqlens_q_padded`` (zigzag per sequence under CP, or the
``balanced`` layout that ``thd.SeqParPackedSeqParams`` names) and the tokens past each real
length (``cu_seqlens_q``) as padded keys; returns ``[t, np*hn]``.

Today's attention, as megatron-core's local ``DotProductAttention`` has it:
  * sliding windows: ``config.window_size = (left, right)`` on the layers that
    ``window_attn_skip_freq`` selects (``is_layer_window_attention``, 1-indexed layers) go to
    ``msp.attention(window_size=...)`` in global positions; blocks and transfers the window
    leaves empty are skipped. Megatron's local attention uses the window mask *instead of*
    the causal one; ours keeps the causal mask as well (the same for ``(left, 0)``, the
    windows of causal models);
  * softmax sinks: ``config.softmax_type`` ``off-by-one`` (a zero offset, a plain tensor)
    or ``learnable`` (the parameter ``softmax_offset``, ``[heads of this TP rank]``, with
    megatron-core's name, initialisation (``config.init_method``) and TP-sharded state dict,
    so checkpoints interchange with its local attention) go to ``softmax_offset=``; the
    parameter's gradient is this CP rank's queries' part, summed over DP x CP by Megatron's
    gradient reduction like every other replicated parameter;
  * MLA: ``MLASelfAttention`` passes ``k_channels`` / ``v_channels`` (the value head dim may
    differ from the query's); the output is ``[sq, b, np * v_channels]``.

RoPE under the balanced packing: ``rope=DocumentRope(...)`` (a spec param) rotates q and k here,
each token at its position in its document, for a model built without megatron-core's RoPE
(``megatron_seqpar.megatron.rope``: megatron-core's THD rotation assumes zigzag).

Not supported, with a clear error: attention bias, cross attention, attention dropout > 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

import megatron_seqpar as msp
from megatron_seqpar import registry
from megatron_seqpar.hostread import once, true_runs
from megatron_seqpar.megatron.checkpointing import Remat
from megatron_seqpar.megatron.parallel_state import sequence_group, tp_group, two_level_groups
from megatron_seqpar.megatron.rope import DocumentRope, rotary_embedding, rotate
from megatron_seqpar.megatron.thd import document_positions, packed_attention_args

_SUPPORTED_MASKS = (
    AttnMaskType.causal,
    AttnMaskType.no_mask,
    AttnMaskType.padding,
    AttnMaskType.padding_causal,
)


def check_config(config, *, attention_type: str = "self", layer_number: int = 1,
                 attention_dropout: float | None = None) -> None:
    """Raise ``ValueError`` for TransformerConfig features the provider cannot honour."""
    if attention_type != "self":
        raise ValueError(
            f"sequence-parallel core attention supports self attention only, got "
            f"attention_type={attention_type!r}"
        )
    p = config.attention_dropout if attention_dropout is None else attention_dropout
    if p:
        raise ValueError(
            f"attention dropout {p} is not supported by the exact sequence-parallel methods; "
            "set TransformerConfig(attention_dropout=0.0) (--attention-dropout 0)"
        )
    if getattr(config, "softmax_type", "vanilla") not in SOFTMAX_TYPES:
        raise ValueError(f"softmax_type={config.softmax_type!r} is not supported; use one of "
                         f"{SOFTMAX_TYPES}")


SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")


def layer_window(config, layer_number: int):
    """This layer's sliding window ``(left, right)`` or None: ``config.window_size`` on the
    layers ``config.window_attn_skip_freq`` selects (megatron-core's own rule)."""
    window = getattr(config, "window_size", None)
    if window and is_layer_window_attention(
            window, getattr(config, "window_attn_skip_freq", None), layer_number):
        return tuple(int(x) for x in window)
    return None


def key_padding_from_mask(attention_mask: torch.Tensor | None, *, sq: int, b: int,
                          cp_rank: int, cp_size: int) -> torch.Tensor | None:
    """This rank's ``[b, sq]`` key-padding mask (True = padded) from a Megatron mask.

    Accepts ``[b|1, 1, 1|sq, sq|P*sq]`` bool masks. A ``[.., sq, ..]`` mask must have padding
    structure (each entry = key padded, or query padded or key padded); anything else raises.
    A key axis of the full length is cut to this rank's zigzag chunks (r and 2P-1-r).
    The structure check reads the mask on the host: it runs once per mask tensor
    (``hostread.once``; every layer of a step passes the same one, so on CUDA one device
    sync per step), and every layer gets the same key-padding tensor back.
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:
        raise ValueError(f"attention_mask must be bool (True = masked), got {m.dtype}")
    if m.dim() != 4 or m.size(1) != 1 or m.size(2) not in (1, sq) or m.size(0) not in (1, b):
        raise ValueError(
            f"attention_mask must be [b, 1, 1, sk] or [b, 1, sq, sk], got {tuple(m.shape)}"
        )
    sk = m.size(3)
    if sk not in (sq, cp_size * sq):
        raise ValueError(
            f"attention_mask key length {sk} is neither the local length {sq} nor the full "
            f"length {cp_size * sq}"
        )
    return once(m, ("key_padding", sq, b, cp_rank, cp_size),
                lambda x: _key_padding(x, sq, b, cp_rank, cp_size))


def padded_key_ranges(attention_mask, *, sq: int, cp_size: int):
    """Per CP rank, the local key ranges holding a padded key (``msp.attention``'s
    ``key_padding_ranges``), from a mask whose key axis is the full sequence (as
    ``get_batch_on_this_cp_rank`` leaves it): read once per mask tensor, so on CUDA the
    blocks without padding run the flash kernel at no per-layer sync. None for a mask with
    only this rank's keys (the other ranks' padding is not known on this rank's host)."""
    if attention_mask is None or attention_mask.size(3) != cp_size * sq:
        return None
    return once(attention_mask, ("padded_ranges", sq, cp_size),
                lambda m: _padded_ranges(m, cp_size))


def _zigzag_keys(keys, rank: int, cp_size: int):
    """Rank ``rank``'s zigzag shard (chunks ``r`` and ``2P-1-r``) of a full key axis ``[b, S]``."""
    if cp_size == 1:
        return keys
    chunks = keys.view(keys.size(0), 2 * cp_size, -1)
    return torch.cat([chunks[:, rank], chunks[:, 2 * cp_size - 1 - rank]], 1)


def _padded_ranges(m, cp_size: int):
    keys = m[:, 0].all(dim=1)  # [b, S]
    return tuple(true_runs(_zigzag_keys(keys, r, cp_size)) for r in range(cp_size))


def _key_padding(m, sq: int, b: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    rows = m[:, 0]  # [b, 1|sq, sk]
    kpm_keys = rows.all(dim=1)  # [b, sk]: exact for padding-structured masks
    # a full key axis -> this rank's zigzag chunks
    kpm_local = _zigzag_keys(kpm_keys, cp_rank, cp_size) if m.size(3) != sq else kpm_keys
    if rows.size(1) == sq:
        keys_only = kpm_keys[:, None, :].expand_as(rows)
        both = keys_only | kpm_local[:, :, None]
        if not (torch.equal(rows, keys_only) or torch.equal(rows, both)):
            raise ValueError(
                "only key-padding masks are supported (mask[i, j] = pad[j] or pad[i] | pad[j]);"
                " arbitrary [b, 1, sq, sk] masks are not"
            )
    return kpm_local.expand(b, sq).contiguous()


def head_parallel_options(method: str, options, config):
    """The method's options with ``head_parallel`` taken from Megatron's
    ``hierarchical_context_parallel_sizes = [U, R]`` when set (two-level sequence parallelism:
    ``--hierarchical-context-parallel-sizes U R``). A different explicit ``head_parallel``
    raises ``ValueError``."""

    sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
    if not sizes:
        return options
    if len(sizes) != 2:
        raise ValueError(f"hierarchical_context_parallel_sizes={list(sizes)}: sequence-parallel "
                         "methods take two levels [U, R] (head all-to-all x method)")
    opts = msp.method_options(method)() if options is None else options
    if opts.head_parallel not in (1, sizes[0]):
        raise ValueError(f"head_parallel={opts.head_parallel} disagrees with "
                         f"hierarchical_context_parallel_sizes={list(sizes)}; set one of them")
    inner, _ = sizes  # config ints, not tensors
    return dataclasses.replace(opts, head_parallel=int(inner))


class SeqParCoreAttention(MegatronModule):
    """Core attention through ``msp.attention(method=...)`` on Megatron's CP group.

    Constructor keywords are megatron-core's core-attention ones (``config, layer_number,
    attn_mask_type, attention_type, attention_dropout, softmax_scale, cp_comm_type,
    pg_collection``) plus ``method``, ``options`` (the method's frozen options dataclass,
    None = defaults), ``rope`` (a ``rope.DocumentRope``: rotate packed q and k here; None =
    megatron-core rotates, or no RoPE) and ``remat`` (rematerialization-aware checkpointing, see
    ``megatron_seqpar.megatron.checkpointing``; None = on when Megatron recomputes this
    attention and the method's registry entry says ``remat``, its backward needing only q, k,
    v, out, lse; True forces it, e.g. for RSA/LSS, which then also keep their score rows /
    gathered K,V until backward), which a ``ModuleSpec``'s ``params`` supplies.
    ``cp_comm_type`` and unknown keywords of other megatron-core versions are accepted and
    ignored.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        *,
        method: str,
        options: Any = None,
        remat: bool | None = None,
        rope: DocumentRope | None = None,
        **kwargs,
    ):
        super().__init__(config=config)

        if method not in msp.METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {msp.METHODS}")
        check_config(config, attention_type=attention_type, layer_number=layer_number,
                     attention_dropout=attention_dropout)
        if attn_mask_type not in _SUPPORTED_MASKS:
            raise ValueError(
                f"attn_mask_type {attn_mask_type} is not supported; use one of "
                f"{[m.name for m in _SUPPORTED_MASKS]}"
            )
        self.method = method
        self.options = head_parallel_options(method, options, config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type  # unused: the method decides its communication
        self.cp_group = sequence_group(pg_collection)
        if self.cp_group.size() != config.context_parallel_size:
            raise ValueError(
                f"CP group has {self.cp_group.size()} ranks but "
                f"config.context_parallel_size={config.context_parallel_size}"
            )
        head_dim = config.kv_channels if k_channels is None else k_channels
        self.window = layer_window(config, self.layer_number)
        self._init_softmax_offset(config, pg_collection)
        # Effective scale: layer scaling divides by layer_number and the fp32 softmax multiplies
        # back, so it cancels (Megatron does it only to keep fp16 scores in range).
        self.softmax_scale = (
            1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
        )
        self.two_level_groups = None
        if self.options is not None and self.options.head_parallel > 1:
            self.two_level_groups = two_level_groups(pg_collection, self.options.head_parallel)
        if remat is None:  # on when Megatron recomputes and keeping costs only out + lse
            remat = registry.get(method).remat and (
                config.recompute_granularity == "full"
                or (config.recompute_granularity == "selective"
                    and "core_attn" in (config.recompute_modules or ()))
            )
        self.remat = None
        if remat:
            self.remat = Remat(method)
        self.rotary = None  # RoPE applied here (balanced packing): megatron_seqpar.megatron.rope
        if rope is not None:
            if k_channels is not None or getattr(config, "multi_latent_attention", False):
                raise ValueError("rope= (RoPE in the provider, for --seqpar-packing balanced) "
                                 "is not supported with MLA, which rotates inside its own "
                                 "attention; use --seqpar-packing zigzag")
            self.rotary = rotary_embedding(rope, config, self.cp_group)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` (this shard) -> ``[sq, b, np*hn]``;
        with THD ``packed_seq_params`` see ``_forward_thd``."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by sequence-parallel attention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in _SUPPORTED_MASKS:
            raise ValueError(f"attn_mask_type {mask_type} is not supported")
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, attention_mask, mask_type,
                                     packed_seq_params)
        if self.rotary is not None:
            raise ValueError("rope= rotates packed documents (THD batches with "
                             "packed_seq_params); this batch has none: build the model with "
                             "megatron-core's RoPE (no rope= in the spec) for unpacked batches")
        sq, b, heads, head_dim = query.shape
        if key.size(0) != sq:
            raise ValueError(f"self attention needs sk == sq, got sk={key.size(0)}, sq={sq}")
        cp_size = self.cp_group.size()
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        kpm = ranges = None
        if mask_type in (AttnMaskType.padding, AttnMaskType.padding_causal):
            kpm = key_padding_from_mask(attention_mask, sq=sq, b=b,
                                        cp_rank=self.cp_group.rank(), cp_size=cp_size)
            ranges = padded_key_ranges(attention_mask, sq=sq, cp_size=cp_size)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, hn]
        out = self._attend(q, k, v, causal=causal, key_padding_mask=kpm,
                           key_padding_ranges=ranges)
        return out.transpose(0, 1).reshape(sq, b, -1)  # [sq, b, np * v head dim]

    def _init_softmax_offset(self, config, pg_collection) -> None:
        """megatron-core's ``softmax_offset``: None (vanilla), a zero tensor (off-by-one) or a
        parameter (learnable), ``[heads of this TP rank]`` in ``params_dtype``."""
        kind = getattr(config, "softmax_type", "vanilla")
        self.tp_group = tp_group(pg_collection)
        if kind == "vanilla":
            self.softmax_offset = None
            return
        tp, heads = self.tp_group.size(), config.num_attention_heads
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        offset = torch.zeros(heads, device=device, dtype=config.params_dtype)
        if config.perform_initialization and kind == "learnable":
            # drawn for every head, then this TP rank's slice kept (like megatron-core's
            # master-weight init of linears): the same values at every TP size (megatron-core's
            # own draws [heads/TP] per rank, so at TP > 1 each rank repeats the first values)
            config.init_method(offset)
        rank = self.tp_group.rank()
        offset = offset[rank * heads // tp:(rank + 1) * heads // tp].clone()
        if kind == "off-by-one":
            self.softmax_offset = offset
            return
        self.softmax_offset = torch.nn.Parameter(offset)
        # split over TP by heads (its sharded state dict says so); megatron-core's own leaves
        # the attribute off, so its grad norm counts only TP rank 0's heads
        set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core's own: the learnable ``softmax_offset`` sharded over TP (dim 0)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        learnable = getattr(self.config, "softmax_type", "vanilla") == "learnable"
        state_dict = self.state_dict(prefix="", keep_vars=True) if learnable else {}
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"softmax_offset": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"))

    def _attend(self, q, k, v, layout: str | None = None, **kw):
        """``msp.attention`` (or its remat twin) on the CP group, public ``[b, s, h, d]``;
        ``layout`` defaults to zigzag (contiguous at CP=1)."""

        if layout is None:
            layout = "zigzag" if self.cp_group.size() > 1 else "contiguous"
        kwargs = dict(method=self.method, group=self.cp_group,
                      softmax_scale=self.softmax_scale, layout=layout,
                      options=self.options, two_level_groups=self.two_level_groups,
                      window_size=self.window, softmax_offset=self.softmax_offset, **kw)
        if self.remat is not None and self.training:
            return self.remat(q, k, v, **kwargs)
        return msp.attention(q, k, v, **kwargs)

    def _forward_thd(self, query, key, value, attention_mask, mask_type, packed_seq_params):
        """Packed sequences (``megatron_seqpar.megatron.thd``): q ``[t, np, hn]``, k/v
        ``[t, ng, hn]`` (megatron-core squeezes the batch of one; ``[t, 1, h, hn]`` is accepted
        too), this rank's tokens in TE's THD partitioning (or the balanced layout when the
        params are ``thd.SeqParPackedSeqParams(layout="balanced")``) -> ``[t, np*hn]``.
        Attention stays inside each sequence of ``cu_seqlens_q_padded`` (causal inside it for
        causal mask types); the tokens past each sequence's real length (``cu_seqlens_q``) are
        masked keys. ``attention_mask`` must be None: the packing describes the mask."""

        if attention_mask is not None:
            raise ValueError("packed (THD) sequences take attention_mask=None: the document and "
                             "padding masks come from packed_seq_params' cu_seqlens")
        tensors = []
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() == 4 and x.size(1) == 1:
                x = x.squeeze(1)
            if x.dim() != 3:
                raise ValueError(f"THD {name} must be [t, heads, head_dim] (or [t, 1, heads, "
                                 f"head_dim]), got {tuple(x.shape)}")
            tensors.append(x)
        q, k, v = tensors
        t, heads, head_dim = q.shape
        if k.size(0) != t:
            raise ValueError(f"self attention needs as many key as query tokens, got {k.size(0)} "
                             f"and {t}")
        rank, size = self.cp_group.rank(), self.cp_group.size()
        cu, kpm, layout = packed_attention_args(packed_seq_params, t, rank, size)
        if kpm is not None:  # a cached host tensor: copied to the device once, not per layer
            kpm = once(kpm, ("to", q.device), lambda x: x.to(q.device))
        if self.rotary is not None:  # each token at its position in its document
            pos = document_positions(cu, rank, size, t, layout)
            pos = once(pos, ("to", q.device), lambda x: x.to(q.device))
            emb = self.rotary(max(b - a for a, b in zip(cu, cu[1:])), packed_seq=True)
            q, k = (rotate(x, emb, pos, self.config, self.cp_group) for x in (q, k))
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        out = self._attend(q[None], k[None], v[None], causal=causal, key_padding_mask=kpm,
                           cu_seqlens=cu, layout=layout)
        return out[0].reshape(t, -1)
