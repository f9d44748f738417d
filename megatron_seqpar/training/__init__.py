"""Pretraining entry points on megatron-core: byte-level GPT and BERT with our attention specs.

Modules (importing any of them has no side effects: no process group, no patching):

- ``arguments``: Megatron-LM-named flags filling a frozen, validated ``TrainConfig``.
- ``data``: the byte tokenizer, the default corpus (Python's own ``pydoc_data`` topics), the
  Megatron indexed dataset builder and the ``GPTDataset`` / ``BERTMaskedWordPieceDataset``
  pipelines, and the zigzag sharding of each batch over the context-parallel group.
- ``model``: megatron-core ``GPTModel`` / ``BertModel`` built from our layer specs.
- ``checkpoint``: save/resume (megatron-core ``dist_checkpointing`` for the model, a documented
  ``torch.save`` file for optimizer, step and RNG state).
- ``report``: JSON-lines log, tqdm progress bar fields and the matplotlib loss/throughput plot.
- ``driver``: ``main(argv, model="gpt"|"bert", cpu_shims=None)``, the loop
  ``examples/pretrain_*.py`` call. On CPU they pass megatron-core's CPU workarounds, which live
  in one module (``megatron_seqpar.cpu_workarounds``) that only CPU entry points import.
"""
