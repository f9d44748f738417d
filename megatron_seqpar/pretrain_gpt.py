"""Pretrain a byte-level GPT on megatron-core with sequence-parallel attention, from an
installed package:

    python -m megatron_seqpar.pretrain_gpt --seqpar-method lightseq --context-parallel-size 1
    torchrun --nproc-per-node 2 -m megatron_seqpar.pretrain_gpt --context-parallel-size 2 \\
        --seqpar-method lightseq

(console script: ``megatron-seqpar-pretrain-gpt``). Flags are Megatron-LM's plus the
``--seqpar-*`` ones (``--help``); see ``megatron_seqpar.training.driver.main``.
"""

import sys

from megatron_seqpar.training.driver import main


def cli() -> int:
    return main(sys.argv[1:], model="gpt")


if __name__ == "__main__":
    sys.exit(cli())
