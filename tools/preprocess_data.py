"""Build a Megatron indexed dataset (``.bin``/``.idx``) of byte-level tokens from text files.

    python tools/preprocess_data.py --input a.txt b.txt --output-prefix data/mycorpus
    python tools/preprocess_data.py --output-prefix data/pydoc --split-sentences   # default text

Writes ``{output_prefix}_text_document`` (one item per document, each ending in the ``eod``
token: for GPT) or, with ``--split-sentences``, ``{output_prefix}_text_sentence`` (one item per
sentence, documents delimited: for BERT), as Megatron-LM's ``tools/preprocess_data.py`` names
them; pass that prefix to ``--data-path``. Tokens are UTF-8 bytes (vocab 256; control bytes 0-8
are reserved for pad/cls/sep/eod/mask and replaced by spaces). Documents: each input file is
split at runs of two or more blank lines. Without ``--input`` the corpus is Python's own
``pydoc_data`` help topics, the training driver's default, so nothing needs downloading.
"""

from __future__ import annotations

import argparse
import sys

from megatron_seqpar.training import data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="*", default=None,
                   help="text files (default: Python's pydoc_data topics)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--split-sentences", action="store_true",
                   help="one item per sentence (BERT) instead of one per document (GPT)")
    args = p.parse_args(argv)
    docs = data.read_documents(args.input) if args.input else data.default_documents()
    if not docs:
        print("error: the input holds no text", file=sys.stderr)
        return 2
    level = "sentence" if args.split_sentences else "document"
    prefix = data.build_indexed_dataset(docs, f"{args.output_prefix}_text_{level}",
                                        split=args.split_sentences)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    print(f"{prefix}.bin/.idx: {len(ds.document_indices) - 1} documents, {len(ds)} items, "
          f"{int(ds.sequence_lengths.sum())} byte tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
