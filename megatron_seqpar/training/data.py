"""Byte-level data on Megatron's indexed dataset format, sharded along the sequence (zigzag).

- ``ByteTokenizer``: vocab 256 (one token per UTF-8 byte, as the LSS paper's enwik8 runs); the
  control bytes 0-4 never occur in the text (``clean_text`` replaces them) and serve as
  pad / cls / sep / eod / mask.
- ``default_documents()``: the default corpus, real English text that ships with Python itself
  (``pydoc_data.topics``: the language reference's help topics, ~465 kB), no download.
- ``build_indexed_dataset(docs, prefix, split_sentences)``: writes ``prefix.bin/.idx`` with
  megatron-core's ``IndexedDatasetBuilder`` (dtype uint8); one item per document for GPT
  (``_text_document``, each document ends in ``eod``), one item per sentence for BERT
  (``_text_sentence``), as Megatron-LM's ``tools/preprocess_data.py`` names them.
- ``build_train_dataset(cfg, prefix)``: megatron-core ``GPTDataset`` or
  ``BERTMaskedWordPieceDataset`` (masked-LM samples padded to ``--seq-length``) through
  ``BlendedMegatronDatasetBuilder``, indexed on global rank 0, cached under
  ``--data-cache-path`` and loaded by every rank.
- ``BatchSource``: the samples of (step, micro-batch) for this data-parallel rank (Megatron's
  sequential pretraining sampler order, so a resumed run reads the same batches), each tensor
  cut along the sequence with ``megatron_seqpar.shard_sequence(..., layout="zigzag")`` over the
  context-parallel group: Megatron's ``get_batch_on_this_cp_rank`` layout. Every rank of the CP
  group reads the same full sample, so CP=1 and CP=2 runs see identical data.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
import torch.distributed as dist

from megatron_seqpar import shard_sequence
from megatron_seqpar.training import preflight
from megatron_seqpar.training.arguments import document_unit

PAD, CLS, SEP, EOD, MASK = 0, 1, 2, 3, 4


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256); duck-types megatron-core's tokenizer interface."""

    vocab_size = 256
    pad, cls, sep, eod, mask = PAD, CLS, SEP, EOD, MASK
    eos = EOD
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 256}

    @property
    def vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Text bytes only (9-255). megatron-core's masked-LM sampler draws its random
        replacement tokens from these keys; were the pad id among them, a replaced (loss)
        position would be marked as padding, and a padded query row is defined differently
        by every attention implementation (uniform in Megatron's local softmax, zero in ours)."""
        return {i: chr(i) for i in range(9, 256)}

    def tokenize(self, text: str) -> np.ndarray:
        return np.frombuffer(clean_text(text).encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) > 8).decode("utf-8", errors="replace")


def clean_text(text: str) -> str:
    """The text with control bytes 0-8 (our special ids) replaced by spaces."""
    return text.translate({i: " " for i in range(9)})


def default_documents() -> list[str]:
    """Python's own help topics (``pydoc_data.topics``), one document per topic, sorted."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_documents(paths) -> list[str]:
    """Text files as documents: each file is split at blank-line runs of 2+ (paragraph groups)."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        docs.extend(d for d in re.split(r"\n\s*\n\s*\n", text) if d.strip())
    return docs


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def split_sentences(doc: str) -> list[str]:
    """A simple sentence splitter (end punctuation or blank lines); keeps all bytes but the cut."""
    return [s for s in _SENTENCE.split(doc) if s.strip()]


def build_indexed_dataset(docs, prefix: str, split: bool = False) -> str:
    """Write ``prefix.bin``/``prefix.idx`` (megatron-core indexed dataset, uint8 tokens).

    ``split=False``: one item per document, followed by ``eod`` (GPT). ``split=True``: one item
    per sentence, documents delimited by ``end_document`` (BERT). Returns ``prefix``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = ByteTokenizer()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint8)
    for doc in docs:
        if split:
            items = [tok.tokenize(s) for s in split_sentences(doc)]
            items = [x for x in items if x.size]
            if not items:
                continue
            for x in items:
                builder.add_item(torch.from_numpy(x))
        else:
            x = tok.tokenize(doc)
            if not x.size:
                continue
            builder.add_item(torch.from_numpy(np.append(x, EOD)))
        builder.end_document()
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")  # atomic: a concurrent reader sees all or nothing
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return prefix


def default_prefix(cfg) -> str:
    level = "sentence" if cfg.model == "bert" else "document"
    return os.path.join(cfg.data_cache_path, f"pydoc_topics_text_{level}")


def prepare_data_prefix(cfg) -> str:
    """The dataset prefix to train on. Text (the default corpus, or ``--data-path`` text files)
    is built into the indexed format on global rank 0 on first use and cached
    (``preflight.text_prefix``); an indexed ``--data-path`` is used as it is."""

    if cfg.data_path:
        kind, found = preflight.data_kind(cfg.data_path)
        if kind == "indexed":
            return found
        prefix, docs = preflight.text_prefix(cfg, found), lambda: read_documents(found)
    else:
        prefix, docs = default_prefix(cfg), default_documents
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
        build_indexed_dataset(docs(), prefix, split=cfg.model == "bert")
    if dist.is_initialized():
        dist.barrier()
    if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
        raise preflight.InputError(
            f"{prefix}.bin/.idx was built by global rank 0 but is not visible here: "
            f"--data-cache-path {cfg.data_cache_path} must be on a file system every node "
            "shares (as Megatron-LM's data cache), or build the data on each node with "
            "tools/preprocess_data.py and pass it as --data-path")
    return prefix


def build_train_dataset(cfg, prefix: str):
    """megatron-core's GPT or BERT masked-LM dataset with ``train_iters * global_batch`` samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    common = dict(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=([prefix], None),
        split=cfg.split, path_to_cache=os.path.join(cfg.data_cache_path, "index"),
        tokenizer=ByteTokenizer(), mid_level_dataset_surplus=0.005,
    )
    if cfg.model == "gpt":
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        cls, config = GPTDataset, GPTDatasetConfig(
            reset_position_ids=cfg.reset_position_ids,
            reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
            create_attention_mask=False, **common)
    else:
        from megatron.core.datasets.bert_dataset import (
            BERTMaskedWordPieceDataset,
            BERTMaskedWordPieceDatasetConfig,
        )

        cls, config = BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig(
            masking_probability=cfg.mask_prob, short_sequence_probability=cfg.short_seq_prob,
            masking_max_ngram=3, masking_do_full_word=False, masking_do_permutation=False,
            masking_use_longer_ngrams=False, masking_use_geometric_distribution=False,
            classification_head=False, **common)
    n = cfg.train_iters * cfg.global_batch_size
    # Every rank reads data (CP ranks shard it themselves); megatron-core builds the index on
    # global rank 0 first and the others load it from the cache.
    train, _, _ = BlendedMegatronDatasetBuilder(cls, [n, None, None], lambda: True,
                                                config).build()
    return train


class BatchSource:
    """This rank's micro-batches, each tensor already cut to this CP rank's shard (zigzag, or
    with ``--reset-attention-mask`` the ``--seqpar-packing`` layout of the packed stream).

    ``get(step, micro)`` reads samples ``step*G + micro*mbs*DP + dp_rank*mbs + [0, mbs)`` (G the
    global batch), i.e. Megatron's sequential sampler, so any step can be re-read on resume.
    GPT batches: ``tokens, labels, loss_mask, position_ids``; BERT: ``tokens, labels,
    loss_mask, padding_mask`` (1 = real token) and ``position_ids``. With
    ``--reset-attention-mask`` the GPT tensors are ``[1, T/CP]`` shards of the packed stream
    plus ``cu_seqlens`` / ``cu_seqlens_padded`` (int32, global, the same on every rank) and
    ``max_seqlen`` (``pack_documents``).
    """

    def __init__(self, dataset, cfg, dp_rank: int, cp_group, device):
        self.dataset, self.cfg, self.dp_rank = dataset, cfg, dp_rank
        self.cp_group, self.device = cp_group, device

    def indices(self, step: int, micro: int) -> list[int]:
        c = self.cfg
        base = (step * c.global_batch_size + micro * c.micro_batch_size * c.data_parallel_size
                + self.dp_rank * c.micro_batch_size)
        return list(range(base, base + c.micro_batch_size))

    def full(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch over the full sequence (every CP rank reads the same)."""
        samples = [self.dataset[i] for i in self.indices(step, micro)]
        if self.cfg.model == "gpt":
            keys = {"tokens": "tokens", "labels": "labels", "loss_mask": "loss_mask"}
        else:
            keys = {"tokens": "text", "labels": "labels", "loss_mask": "loss_mask",
                    "padding_mask": "padding_mask"}
        out = {}
        for name, key in keys.items():
            out[name] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
        out["labels"] = out["labels"].long().clamp_min(0)  # BERT marks unmasked labels -1
        out["loss_mask"] = out["loss_mask"].float()
        if "padding_mask" in out:
            out["padding_mask"] = (out["padding_mask"] > 0.5).long()  # Megatron pads with 0 or -1
        b, s = out["tokens"].shape
        if self.cfg.model == "gpt":  # megatron-core's (reset after EOD with --reset-position-ids)
            out["position_ids"] = torch.stack(
                [torch.as_tensor(np.asarray(x["position_ids"])) for x in samples]).long()
        else:
            out["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
        if self.cfg.reset_attention_mask:
            out = pack_documents(out, eod=EOD, unit=document_unit(self.cfg),
                                 stream_multiple=self.cfg.context_parallel_size)
        return out

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        out = self.full(step, micro)
        cu = out.get("cu_seqlens_padded")
        if self.cp_group is not None and self.cp_group.size() > 1:
            layout = self.cfg.seqpar_packing if cu is not None else "zigzag"
            out = {k: v if k in PACKING_KEYS else shard_sequence(
                v, dim=1, group=self.cp_group, layout=layout, cu_seqlens=cu)
                for k, v in out.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}


PACKING_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def document_lengths(tokens: torch.Tensor, eod: int = EOD) -> list[int]:
    """Lengths of the document pieces of ``tokens`` ``[b, s]``, row by row: a piece ends
    after each EOD token and at the row's end (Megatron's ``--reset-attention-mask``: a token
    after an EOD sees nothing up to and including it; rows are separate samples)."""
    lengths = []
    for row in tokens:
        cuts = [0] + [e for e in ((row == eod).nonzero().flatten() + 1).tolist()
                      if e < row.numel()] + [row.numel()]
        lengths += [b - a for a, b in zip(cuts, cuts[1:])]
    return lengths


def pack_documents(batch: dict[str, torch.Tensor], *, eod: int = EOD,
                   unit: int = 1, stream_multiple: int = 1) -> dict[str, torch.Tensor]:
    """One packed stream ``[1, T]`` of a micro-batch ``[b, s]`` of GPT tensors (``tokens,
    labels, loss_mask, position_ids``), documents cut at EOD (``document_lengths``).

    Each piece of real length ``L`` takes ``ceil(L/unit)*unit`` slots: its tokens first, then
    pad tokens (id ``PAD``, label ``PAD``, loss mask 0, position 0). ``T`` = the sum of those,
    a multiple of ``unit``; it varies with the data by at most ``unit-1`` per piece. When ``T``
    is not a multiple of ``stream_multiple`` (e.g. CP for the balanced layout) one more piece of
    pads only (real length 0) fills it up. Adds
    ``cu_seqlens`` (cumulative real lengths), ``cu_seqlens_padded`` (piece boundaries in the
    stream), both int32, and ``max_seqlen`` (the longest padded piece, a 1-element tensor),
    megatron-core's ``PackedSeqParams`` convention (on the host; the stream tensors stay on
    ``batch``'s device). Causal attention inside each piece never
    lets a real token see a pad (pads come last), so the packed step equals Megatron's
    dense-mask step exactly."""
    tokens = batch["tokens"]
    lengths = torch.tensor(document_lengths(tokens, eod), dtype=torch.long)
    padded = (lengths + unit - 1) // unit * unit
    fill = -int(padded.sum()) % stream_multiple
    if fill:  # a last piece of pads only
        lengths = torch.cat([lengths, torch.zeros(1, dtype=torch.long)])
        padded = torch.cat([padded, torch.tensor([fill])])
    zero = torch.zeros(1, dtype=torch.long)
    cu_real, cu_pad = torch.cat([zero, lengths.cumsum(0)]), torch.cat([zero, padded.cumsum(0)])
    piece = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    where = cu_pad[:-1][piece] + torch.arange(tokens.numel()) - cu_real[:-1][piece]
    where = where.to(tokens.device)
    total = int(cu_pad[-1])
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        x = batch[key]
        stream = torch.zeros(1, total, dtype=x.dtype, device=x.device)
        stream[0, where] = x.reshape(-1)
        out[key] = stream
    out["cu_seqlens"] = cu_real.to(torch.int32)
    out["cu_seqlens_padded"] = cu_pad.to(torch.int32)
    out["max_seqlen"] = padded.max().reshape(1).to(torch.int32)
    return out
