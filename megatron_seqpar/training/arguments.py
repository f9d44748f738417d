"""Command-line flags (Megatron-LM's names where one exists) filling a frozen ``TrainConfig``.

``parse_args(argv, model="gpt", world_size=None)`` returns a validated ``TrainConfig``; a bad
combination (sequence length not divisible by 2*CP, heads not divisible by TP, world size not a
multiple of TP*CP, ...) raises ``ConfigError`` with one line naming the fix, before any process
group exists. ``driver.main`` turns that into ``error: <line>`` and exit status 2.

Megatron-LM names: --num-layers --hidden-size --ffn-hidden-size --num-attention-heads
--num-query-groups --seq-length --max-position-embeddings --position-embedding-type
--micro-batch-size --global-batch-size --lr --min-lr --lr-decay-style --lr-warmup-iters
--weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad --init-method-std
--hidden-dropout --attention-dropout --train-iters --seed --tensor-model-parallel-size
--context-parallel-size --save --load --save-interval --exit-interval --log-interval --data-path
--data-cache-path --split --bf16 --recompute-granularity --recompute-method
--recompute-num-layers --sequence-parallel --distributed-backend --distributed-timeout-minutes
--mask-prob --short-seq-prob
--untie-embeddings-and-output-weights --reset-attention-mask --reset-position-ids
--eod-mask-loss (GPT documents: ``training.data`` packs them into cu_seqlens, no dense mask)
--hierarchical-context-parallel-sizes U R (two-level sequence parallelism with --seqpar-method:
a head all-to-all inside groups of U consecutive CP ranks, the method across the R = CP/U
groups, on megatron-core's hierarchical CP groups).
Today's attention (GPT): --window-size L,R (sliding window, -1 = unbounded side)
--window-attn-skip-freq N (every N-th layer, 1-indexed, keeps full attention) --softmax-type
{vanilla,off-by-one,learnable} (softmax sinks) --multi-latent-attention with --q-lora-rank
--kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim --v-head-dim (MLA, needs --seqpar-method:
megatron-core's local attention takes no separate V head dim).
Ours: --seqpar-method {rsa,mqsp,lss,lightseq} and the method options (--seqpar-backend,
--seqpar-mqsp-micro-q, --[no-]seqpar-lightseq-balance, ...: defined once, in
``megatron_seqpar.megatron_lm.add_seqpar_args``, so Megatron-LM's patched scripts and these
entry points take the same flags), --fp64, --device, --log-dir, --no-progress-bar, --no-plot,
--cpu-threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_seqpar import flag_rules
from megatron_seqpar.api import method_options
from megatron_seqpar.flags import (
    SeqParArgumentError,
    add_seqpar_args,
    option_flags,
    options_from_args,
)
from megatron_seqpar.registry import METHODS

MODELS = ("gpt", "bert")


class ConfigError(ValueError):
    """A bad flag combination; the message is one line that names the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one pretraining run needs; validated on construction (see ``validate``)."""

    model: str = "gpt"
    # model shape
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int | None = None
    num_attention_heads: int = 2
    num_query_groups: int | None = None
    seq_length: int = 4096
    max_position_embeddings: int | None = None
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # today's attention (megatron-core's names)
    window_size: tuple[int, int] | None = None  # sliding window (left, right)
    window_attn_skip_freq: int | None = None  # every N-th layer keeps full attention
    softmax_type: str = "vanilla"  # "off-by-one" / "learnable": softmax sinks
    multi_latent_attention: bool = False  # MLA (GPT); Megatron-LM's defaults below
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # batch and optimisation
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 10
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    use_distributed_optimizer: bool = False  # megatron-core's, sharded over DP x CP (CUDA)
    fp64: bool = False  # ours: float64 parameters and activations (CPU), for exactness checks
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # parallelism
    world_size: int = 1
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False  # Megatron's TP sequence parallelism (needs TP > 1)
    hierarchical_context_parallel_sizes: tuple[int, ...] | None = None  # (U, R): two levels
    seqpar_method: str | None = None
    seqpar_packing: str = "zigzag"  # CP layout of packed documents (flag_rules.PACKINGS)
    seqpar_options: tuple[tuple[str, Any], ...] = ()  # (Options field, value) given
    distributed_backend: str | None = None
    distributed_timeout_minutes: float = 10.0  # every collective's bound (Megatron-LM's flag)
    device: str = "auto"
    cpu_threads: int | None = None
    # data
    data_path: str | None = None
    data_cache_path: str = "data/cache"
    split: str = "100,0,0"
    mask_prob: float = 0.15
    short_seq_prob: float = 0.1
    # GPT documents (Megatron-LM's flags; documents end at the EOD token), training.data
    reset_attention_mask: bool = False  # attention stays inside each document (cu_seqlens)
    reset_position_ids: bool = False  # positions restart after each EOD
    eod_mask_loss: bool = False  # no loss at EOD positions
    document_pad_multiple: int | None = None  # ours: pad each packed document to a multiple
    # checkpoints and reporting
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    exit_interval: int | None = None
    log_interval: int = 1
    log_dir: str | None = None
    progress_bar: bool = True
    plot: bool = True
    # derived (filled in __post_init__)
    data_parallel_size: int = field(init=False, default=1)
    num_microbatches: int = field(init=False, default=1)

    def __post_init__(self):
        validate(self)
        dp = self.world_size // (self.tensor_model_parallel_size * self.context_parallel_size)
        object.__setattr__(self, "data_parallel_size", dp)
        object.__setattr__(self, "num_microbatches",
                           self.global_batch_size // (self.micro_batch_size * dp))

    @property
    def attention_method(self) -> str | None:
        """The method that runs the attention: ``seqpar_method``, or None (megatron-core's
        local attention) where it is inactive: at CP=1, except with MLA (``flag_rules``) or
        packed documents (cu_seqlens, which the local attention cannot take)."""
        active = flag_rules.method_active(self) or self.reset_attention_mask
        return self.seqpar_method if active else None

    @property
    def rope_in_provider(self) -> bool:
        """RoPE rotated by our core attention, the model built without megatron-core's
        (``flag_rules.rope_in_provider``: balanced packing, whose layout megatron-core's THD
        rotation does not know)."""
        return self.attention_method is not None and flag_rules.rope_in_provider(self)

    @property
    def optimizer_instances(self) -> int:
        """megatron-core's ``num_distributed_optimizer_instances``: for LSS with the
        distributed optimizer at CP > 1 one per DP replica (each sharded over its CP group,
        so Megatron's reduce-scatter is LSS's level 1 and the all-reduce across instances
        level 2, ``megatron.lss_grad.check_distributed_optimizer_levels``); else 1."""
        lss = self.seqpar_method == "lss" and self.context_parallel_size > 1
        return self.data_parallel_size if lss and self.use_distributed_optimizer else 1

    @property
    def causal(self) -> bool:
        return self.model == "gpt"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_backend(self) -> str:
        if self.distributed_backend:
            return self.distributed_backend
        return "nccl" if self.resolved_device() == "cuda" else "gloo"

    def resolved_log_dir(self) -> str:
        return self.log_dir or os.path.join("runs", f"{self.model}-{self.seqpar_method or 'local'}")

    def method_options(self):
        """The method's frozen ``Options`` from the ``--seqpar-*`` option flags (or None)."""
        if self.seqpar_method is None:
            return None

        try:
            return method_options(self.seqpar_method)(**dict(self.seqpar_options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--seqpar-method {self.seqpar_method}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(c: TrainConfig) -> None:
    """Raise ``ConfigError`` (one line, names the fix) for the first bad combination."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(c.model in MODELS, f"model must be one of {MODELS}, got {c.model!r}")
    need(c.seqpar_method is None or c.seqpar_method in METHODS,
         f"--seqpar-method must be one of {METHODS}, got {c.seqpar_method!r}")
    need(c.seqpar_packing in flag_rules.PACKINGS,
         f"--seqpar-packing must be one of {flag_rules.PACKINGS}, got {c.seqpar_packing!r}")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "global_batch_size", "train_iters", "world_size",
                 "tensor_model_parallel_size", "context_parallel_size", "log_interval"):
        need(getattr(c, name) > 0, f"--{name.replace('_', '-')} must be positive")
    tp, cp, heads = c.tensor_model_parallel_size, c.context_parallel_size, c.num_attention_heads
    need(c.world_size % (tp * cp) == 0,
         f"world size {c.world_size} is not a multiple of TP*CP = {tp}*{cp}; launch a multiple "
         f"of {tp * cp} processes or change --tensor-model-parallel-size/--context-parallel-size")
    need(heads % tp == 0, f"--num-attention-heads {heads} is not divisible by "
         f"--tensor-model-parallel-size {tp}")
    need(c.hidden_size % heads == 0,
         f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads {heads}")
    groups = c.num_query_groups or heads
    need(heads % groups == 0, f"--num-attention-heads {heads} is not divisible by "
         f"--num-query-groups {groups}")
    need(groups % tp == 0, f"--num-query-groups {groups} is not divisible by "
         f"--tensor-model-parallel-size {tp}")
    need(cp == 1 or c.seq_length % (2 * cp) == 0,
         f"--seq-length {c.seq_length} is not divisible by 2*CP = {2 * cp} (zigzag layout); "
         f"use a multiple of {2 * cp}")
    need(not c.sequence_parallel or tp > 1,
         "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence "
         "over the TP group, as in Megatron-LM)")
    need(not c.sequence_parallel or (c.seq_length // cp) % tp == 0,
         f"--sequence-parallel: the local sequence length {c.seq_length // cp} (seq length / CP) "
         f"is not divisible by --tensor-model-parallel-size {tp}")
    try:  # the --seqpar-* rules shared with the Megatron-LM route
        flag_rules.check_first(flag_rules.View(flag_rules.DRIVER, c.model, c,
                                               dict(c.seqpar_options)))
    except flag_rules.FlagError as e:
        raise ConfigError(str(e)) from None
    need(c.max_position_embeddings is None or c.max_position_embeddings >= c.seq_length,
         "--max-position-embeddings must be at least --seq-length")
    dp = c.world_size // (tp * cp)
    need(c.global_batch_size % (c.micro_batch_size * dp) == 0,
         f"--global-batch-size {c.global_batch_size} is not divisible by micro batch * DP = "
         f"{c.micro_batch_size}*{dp}")
    need(c.position_embedding_type in ("learned_absolute", "rope"),
         "--position-embedding-type must be learned_absolute or rope")
    need(c.lr_decay_style in ("constant", "linear", "cosine"),
         "--lr-decay-style must be constant, linear or cosine")
    need(c.lr > 0 and 0 <= c.min_lr <= c.lr, "need --lr > 0 and 0 <= --min-lr <= --lr")
    need(0 <= c.hidden_dropout < 1 and 0 <= c.attention_dropout < 1, "dropouts must be in [0, 1)")
    need(c.recompute_granularity in (None, "full", "selective"),
         "--recompute-granularity must be full or selective")
    need(c.recompute_granularity != "full" or c.recompute_method in ("uniform", "block"),
         "--recompute-granularity full needs --recompute-method uniform or block")
    need(c.recompute_method is None or c.recompute_granularity == "full",
         "--recompute-method needs --recompute-granularity full")
    need(c.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda")
    need(c.distributed_backend in (None, "gloo", "nccl"), "--distributed-backend gloo or nccl")
    need(c.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive")
    need(not (c.bf16 and c.fp64), "--bf16 and --fp64 exclude each other")
    need(not (c.use_distributed_optimizer and c.resolved_device() == "cpu"),
         "--use-distributed-optimizer is megatron-core's optimizer, which our driver runs on "
         "CUDA only (the CPU path uses torch.optim); drop it on CPU")
    need(not (c.use_distributed_optimizer and (c.save or c.load)),
         "--use-distributed-optimizer with --save/--load is not supported by our driver yet "
         "(Megatron-LM's pretrain_gpt.py saves it); drop one of them")
    need(not (c.bf16 and c.resolved_device() == "cpu"),
         "--bf16 needs a CUDA device (the CPU path uses torch.optim in fp32); drop --bf16")
    need(c.resolved_backend() != "nccl" or c.resolved_device() == "cuda",
         "--distributed-backend nccl needs a CUDA device")
    need(0 < c.mask_prob < 1, "--mask-prob must be in (0, 1)")
    need(c.save_interval is None or c.save_interval > 0, "--save-interval must be positive")
    need(c.save_interval is None or c.save, "--save-interval needs --save DIR")
    need(c.exit_interval is None or c.exit_interval > 0, "--exit-interval must be positive")
    _validate_documents(c, need)
    _validate_attention(c, need)
    if c.seqpar_options:
        need(c.seqpar_method is not None, "--seqpar-* option flags need --seqpar-method")
        c.method_options()  # raises ConfigError / ValueError naming the bad field


def _validate_attention(c: TrainConfig, need) -> None:
    """Windows, sinks and MLA (the rules shared with Megatron-LM are in ``flag_rules``)."""
    w = c.window_size
    need(w is None or (len(w) == 2 and all(isinstance(x, int) and x >= -1 for x in w)),
         f"--window-size takes two ints >= -1 as L,R (-1 = unbounded), got {w!r}")
    need(c.window_attn_skip_freq is None or (c.window_attn_skip_freq > 0 and w is not None),
         "--window-attn-skip-freq needs --window-size and a positive N")
    need(c.softmax_type in ("vanilla", "off-by-one", "learnable"),
         "--softmax-type must be vanilla, off-by-one or learnable")
    for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        need(getattr(c, name) > 0, f"--{name.replace('_', '-')} must be positive")


def _window_pair(text: str) -> tuple[int, int]:
    """``--window-size``: ``L,R`` (or ``(L, R)``, as Megatron-LM's tuple flags print)."""
    try:
        pair = tuple(int(x) for x in text.strip("()[] ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L,R (two ints), got {text!r}") from None
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected L,R (two ints), got {text!r}")
    return pair


def document_unit(c: TrainConfig) -> int:
    """The length every packed document is padded to a multiple of (``--reset-attention-mask``):
    ``--document-pad-multiple``, else 2*CP (the zigzag layout's least), 1 at CP=1 and with
    ``--seqpar-packing balanced`` (which needs only the stream to divide by CP)."""
    return c.document_pad_multiple or flag_rules.least_document_multiple(
        c.context_parallel_size, c.seqpar_packing)


def _validate_documents(c: TrainConfig, need) -> None:
    """The driver's own document flag (``--document-pad-multiple``); the rest of the document
    rules are shared with the Megatron-LM route (``flag_rules``)."""
    need(c.document_pad_multiple is None or c.reset_attention_mask,
         "--document-pad-multiple needs --reset-attention-mask")
    cp = c.context_parallel_size
    least = flag_rules.least_document_multiple(cp, c.seqpar_packing)
    need(c.document_pad_multiple is None
         or (c.document_pad_multiple > 0 and c.document_pad_multiple % least == 0),
         f"--document-pad-multiple {c.document_pad_multiple} is not a positive multiple of "
         f"2*CP = {2 * cp} (zigzag cuts every document in 2*CP chunks; --seqpar-packing "
         "balanced takes any)")


def build_parser(model: str = "gpt") -> argparse.ArgumentParser:
    """The argparse parser; defaults are the README demo: a byte-level 2-layer, hidden-128
    model at sequence length 4096, 200 steps of one sequence (about 4 minutes on 2 CPU
    processes with ``--context-parallel-size 2 --seqpar-method lightseq``)."""
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog=f"pretrain_{model}.py",
        description=f"Pretrain a byte-level {model.upper()} on megatron-core with sequence-"
        "parallel attention (run one process per rank, e.g. with torchrun).",
    )

    def add(flag, type_=None, **kw):
        name = flag.lstrip("-").replace("-", "_")
        if type_ is not None:
            kw["type"] = type_
        kw.setdefault("default", d[name].default if name in d else None)
        p.add_argument(flag, **kw)

    g = p
    for flag, t in (("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
                    ("--num-attention-heads", int), ("--num-query-groups", int),
                    ("--seq-length", int), ("--max-position-embeddings", int),
                    ("--init-method-std", float), ("--hidden-dropout", float),
                    ("--attention-dropout", float), ("--micro-batch-size", int),
                    ("--global-batch-size", int), ("--train-iters", int), ("--lr", float),
                    ("--min-lr", float), ("--lr-warmup-iters", int), ("--weight-decay", float),
                    ("--adam-beta1", float), ("--adam-beta2", float), ("--adam-eps", float),
                    ("--clip-grad", float), ("--seed", int), ("--recompute-num-layers", int),
                    ("--tensor-model-parallel-size", int), ("--context-parallel-size", int),
                    ("--cpu-threads", int), ("--data-path", str), ("--data-cache-path", str),
                    ("--split", str), ("--mask-prob", float), ("--short-seq-prob", float),
                    ("--save", str), ("--load", str), ("--save-interval", int),
                    ("--exit-interval", int), ("--log-interval", int), ("--log-dir", str),
                    ("--distributed-timeout-minutes", float), ("--window-attn-skip-freq", int),
                    ("--q-lora-rank", int), ("--kv-lora-rank", int), ("--qk-head-dim", int),
                    ("--qk-pos-emb-head-dim", int), ("--v-head-dim", int)):
        add(flag, t)
    add("--window-size", _window_pair, metavar="L,R",
        help="sliding-window attention: a query at i sees keys i-L..i+R (-1 = unbounded)")
    add("--softmax-type", choices=("vanilla", "off-by-one", "learnable"),
        help="softmax sinks: one extra logit per head (zero, or a learnable parameter)")
    add("--multi-latent-attention", action="store_true",
        help="GPT with multi-latent attention (MLA; needs --seqpar-method)")
    add("--position-embedding-type", choices=("learned_absolute", "rope"))
    add("--lr-decay-style", choices=("constant", "linear", "cosine"))
    add("--recompute-granularity", choices=("full", "selective"))
    add("--recompute-method", choices=("uniform", "block"))
    add("--distributed-backend", choices=("gloo", "nccl"))
    add("--device", choices=("auto", "cpu", "cuda"))
    add("--hierarchical-context-parallel-sizes", int, nargs=2, metavar=("U", "R"),
        help="two-level sequence parallelism (Megatron-LM's flag): a head all-to-all inside "
        "groups of U consecutive CP ranks and --seqpar-method across the R = CP/U groups")
    add("--sequence-parallel", action="store_true",
        help="Megatron's sequence parallelism inside the TP group (norms, dropout and "
        "embeddings on 1/TP of the tokens); needs --tensor-model-parallel-size > 1")
    add("--bf16", action="store_true")
    add("--use-distributed-optimizer", action="store_true",
        help="megatron-core's distributed optimizer (CUDA); with LSS one instance per DP "
        "replica, sharded over its CP group: the two levels of its gradient averaging")
    add("--fp64", action="store_true",
        help="float64 parameters and activations (ours; for exactness checks on CPU)")
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--reset-attention-mask", action="store_true",
        help="GPT: attention stays inside each document (documents end at EOD), through "
        "cu_seqlens (needs --seqpar-method)")
    add("--reset-position-ids", action="store_true",
        help="GPT: position ids restart after each EOD")
    add("--eod-mask-loss", action="store_true", help="GPT: no loss on EOD tokens")
    add("--document-pad-multiple", int,
        help="ours, with --reset-attention-mask: pad each packed document to a multiple of "
        "this (default 2*CP; a multiple of 2*CP)")
    add_seqpar_args(p)  # the same --seqpar-* flags as Megatron-LM's patched scripts
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--bert-no-binary-head", action="store_true",
                   help="accepted for Megatron-LM compatibility; the binary head is always off")
    return p


def parse_args(argv=None, model: str = "gpt", world_size: int | None = None) -> TrainConfig:
    """Parse ``argv`` into a validated ``TrainConfig`` (``ConfigError`` on a bad combination).

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 when unset), so the check against
    TP*CP runs before any process group is built.
    """
    ns = vars(build_parser(model).parse_args(argv))
    try:
        options_from_args(argparse.Namespace(**ns))  # flags of another method, bad values
    except SeqParArgumentError as e:
        raise ConfigError(str(e)) from None
    pairs = []
    for _, dest, _, f in option_flags():
        value = ns.pop(dest)
        if value is not None:
            pairs.append((f.name, value))
    ns.pop("bert_no_binary_head")
    if ns["hierarchical_context_parallel_sizes"] is not None:
        ns["hierarchical_context_parallel_sizes"] = tuple(ns["hierarchical_context_parallel_sizes"])
    ns["progress_bar"] = not ns.pop("no_progress_bar")
    ns["plot"] = not ns.pop("no_plot")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return TrainConfig(model=model, world_size=world_size, seqpar_options=tuple(pairs), **ns)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. an Options field rejecting its value
        raise ConfigError(str(e).splitlines()[0]) from None
