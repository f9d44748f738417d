"""Pretrain a byte-level BERT on megatron-core with sequence-parallel attention, from an
installed package:

    python -m megatron_seqpar.pretrain_bert --seqpar-method lightseq --context-parallel-size 1
    torchrun --nproc-per-node 2 -m megatron_seqpar.pretrain_bert --context-parallel-size 2 \\
        --seqpar-method lightseq

(console script: ``megatron-seqpar-pretrain-bert``). Flags are Megatron-LM's plus the
``--seqpar-*`` ones (``--help``); see ``megatron_seqpar.training.driver.main``.
"""

import sys

from megatron_seqpar.training.driver import main


def cli() -> int:
    return main(sys.argv[1:], model="bert")


if __name__ == "__main__":
    sys.exit(cli())
