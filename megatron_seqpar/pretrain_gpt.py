"""Pretrain a byte-level GPT on megatron-core with sequence-parallel attention, from an
installed package (console script ``megatron-seqpar-pretrain-gpt``):

    python -m megatron_seqpar.pretrain_gpt --seqpar-method lightseq
    torchrun --nproc-per-node 2 -m megatron_seqpar.pretrain_gpt --context-parallel-size 2 \\
        --seqpar-method lightseq

Flags are Megatron-LM's plus the ``--seqpar-*`` ones (``--help``).
"""

import sys

from megatron_seqpar.training.driver import main_gpt

if __name__ == "__main__":
    sys.exit(main_gpt())
