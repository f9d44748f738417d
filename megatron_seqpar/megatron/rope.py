"""RoPE under the balanced packing: each token rotated at its position in its document.

megatron-core rotates packed (THD) queries and keys inside ``SelfAttention``, before core
attention, and its THD rotation (``rope_utils._apply_rotary_pos_emb_thd``) assumes the zigzag
layout: it cuts this rank's tokens of every document as ``L_i / CP`` tokens in two zigzag
chunks. The balanced layout keeps short documents whole on one rank and splits long ones
(``megatron_seqpar.balance``), so there that rotation would be wrong. With ``--seqpar-packing
balanced --position-embedding-type rope`` the model is therefore built without megatron-core's
RoPE (``position_embedding_type="none"``; RoPE has no weights, so parameters and checkpoints
are the RoPE model's) and the core-attention provider rotates q and k itself
(``SeqParCoreAttention(rope=DocumentRope(...))``), after megatron-core's projections and
before the method: megatron-core's own frequency table (``RotaryEmbedding``) and rotation
(``apply_rotary_pos_emb``), at each token's position in its padded document
(``thd.document_positions``: from the boundaries alone, no communication, cached). At CP=1 this
is the rotation megatron-core's THD path gives (``tests/test_training_packed.py`` compares
the two). MLA rotates inside its own attention module: not supported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


@dataclass(frozen=True)
class DocumentRope:
    """The RoPE settings megatron-core's ``GPTModel`` takes (its defaults), for the provider to
    apply them itself; ``config.kv_channels`` and ``config.rotary_interleaved`` come from the
    layer's ``TransformerConfig``."""

    rotary_percent: float = 1.0
    rotary_base: int = 10000
    seq_len_interpolation_factor: float | None = None
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0

    def __post_init__(self):
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent={self.rotary_percent} must be in (0, 1]")
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base={self.rotary_base} must be positive")


def rotary_embedding(rope: DocumentRope, config, cp_group) -> RotaryEmbedding:
    """megatron-core's frequency table for ``rope`` (no parameters, no buffers: the state dict
    of the layer is unchanged)."""
    return RotaryEmbedding(
        kv_channels=config.kv_channels, rotary_percent=rope.rotary_percent,
        rotary_interleaved=config.rotary_interleaved,
        seq_len_interpolation_factor=rope.seq_len_interpolation_factor,
        rotary_base=rope.rotary_base, rope_scaling=rope.rope_scaling,
        rope_scaling_factor=rope.rope_scaling_factor,
        use_cpu_initialization=config.use_cpu_initialization, cp_group=cp_group)


def rotate(x: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, config,
           cp_group) -> torch.Tensor:
    """``x`` ``[t, heads, head_dim]`` rotated at positions ``pos`` ``[t]`` by the table ``emb``
    (``[n, 1, 1, rot_dim]``): megatron-core's rotation on a batch of one, the same arithmetic
    its THD path runs on its own position table."""
    return apply_rotary_pos_emb(x.unsqueeze(1), emb[pos], config=config,
                                cp_group=cp_group).squeeze(1)
