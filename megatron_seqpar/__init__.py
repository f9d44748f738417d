"""megatron-seqpar: exact sequence-parallel attention (RSA, MQSP, LSS, LightSeq) for Megatron.

Public functional contract (see README):

    import megatron_seqpar as msp
    out = msp.attention(q, k, v, method="lightseq", group=None, causal=True,
                        softmax_scale=None, layout="contiguous", key_padding_mask=None,
                        options=None)
    x_local = msp.shard_sequence(x, dim=1, group=None, layout="contiguous")
    x_full = msp.gather_sequence(x_local, dim=1, group=None, layout="contiguous")

Importing the package has no side effects: no process group, no Megatron import.
"""

from megatron_seqpar.api import METHODS, attention, method_options
from megatron_seqpar.layouts import LAYOUTS, gather_sequence, shard_sequence

__all__ = [
    "LAYOUTS",
    "METHODS",
    "attention",
    "gather_sequence",
    "method_options",
    "shard_sequence",
]
__version__ = "0.1.0"
