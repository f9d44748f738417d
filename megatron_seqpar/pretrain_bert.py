"""``python -m megatron_seqpar.pretrain_bert``: BERT (masked LM) pretraining, as
``megatron_seqpar.pretrain_gpt`` for GPT (console script ``megatron-seqpar-pretrain-bert``)."""

import sys

from megatron_seqpar.training.driver import main_bert

if __name__ == "__main__":
    sys.exit(main_bert())
