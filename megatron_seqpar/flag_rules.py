"""The rules of the ``--seqpar-*`` flags against the rest of a command line, each written once.

Both routes read them: our driver (``training.arguments.validate``, on a ``TrainConfig``) and
Megatron-LM's (``megatron_lm.seqpar_conflicts``, on Megatron-LM's parsed ``args``). Both objects
use the same attribute names, so a rule reads ``view.<name>`` from either, through ``view()``.
A rule is a function ``(view) -> message | None``; ``@rule(*routes)`` registers it, in order.

- ``check_first(view)`` raises ``FlagError`` at the first broken rule: the driver's one-line
  error (generic driver checks such as batch sizes stay in ``training.arguments``);
- ``check_all(view)`` returns every broken rule's message: Megatron-LM's route lists them all
  (nothing to check there without ``--seqpar-method``).

No torch or Megatron import: the caller passes what needs them (the registered method names,
which optional packages are installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DRIVER, MEGATRON_LM = "driver", "megatron_lm"
BOTH = (DRIVER, MEGATRON_LM)
PACKINGS = ("zigzag", "balanced")  # --seqpar-packing (megatron.thd.PACKINGS)


def least_document_multiple(cp: int, packing: str) -> int:
    """The least multiple every packed document is padded to: ``2*CP`` for zigzag at CP > 1
    (it cuts every document in 2*CP chunks), else 1 (the balanced layout needs only the
    stream to divide by CP)."""
    return 2 * cp if cp > 1 and packing == "zigzag" else 1


class FlagError(ValueError):
    """The first broken rule; one line that names the fix."""


@dataclass(frozen=True)
class View:
    """What the rules read: the object's attributes (``TrainConfig`` or Megatron-LM ``args``,
    missing ones get Megatron-LM's defaults), the route, the model, the method's option values
    given on the command line (``options``), and facts about installed packages."""

    route: str
    model: str
    obj: Any
    options: dict = field(default_factory=dict)
    installed: frozenset = frozenset({"transformer_engine", "apex",
                                      "fused_weight_gradient_mlp_cuda"})

    def __getattr__(self, name: str):
        return getattr(self.obj, name, DEFAULTS.get(name))


DEFAULTS = dict(context_parallel_size=1, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=1, position_embedding_type="learned_absolute",
                attention_dropout=0.0, softmax_type="vanilla", transformer_impl="local",
                create_attention_mask_in_dataloader=True, num_distributed_optimizer_instances=1,
                data_parallel_size=1, use_distributed_optimizer=False,
                seqpar_packing="zigzag")


@dataclass(frozen=True)
class Rule:
    name: str
    routes: tuple[str, ...]
    check: Callable[[View], str | None]


RULES: list[Rule] = []


def rule(*routes: str):
    def add(fn):
        RULES.append(Rule(fn.__name__, routes, fn))
        return fn
    return add


def broken(view: View) -> list[tuple[str, str]]:
    """``(rule name, message)`` of every broken rule of the view's route, in order."""
    if view.route == MEGATRON_LM and not method_active(view):
        return []
    return [(r.name, msg) for r in RULES if view.route in r.routes
            for msg in (r.check(view),) if msg is not None]


def method_active(v) -> bool:
    """Whether ``--seqpar-method`` runs on Megatron-LM's route: at CP=1 the run is plain
    Megatron-LM (its own local attention) and the method is inactive, except with MLA, which
    megatron-core's local attention cannot run (our provider runs it, on a group of one)."""
    get = lambda name, default: getattr(v, name, default) or default  # View or Megatron args
    return get("seqpar_method", None) is not None and (get("context_parallel_size", 1) > 1
                                                       or bool(get("multi_latent_attention", 0)))


INACTIVE_LOG = "megatron-seqpar: CP=1"


def inactive_note(method: str, attention: str) -> str:
    """The one line both routes print when ``--seqpar-method`` is inactive (CP=1)."""
    return (f"{INACTIVE_LOG}: --seqpar-method {method} is inactive at CP=1: {attention} (the "
            "same flags work at CP > 1)")


def check_all(view: View) -> list[str]:
    return [msg for _, msg in broken(view)]


def check_first(view: View) -> None:
    for r in RULES:
        if view.route in r.routes and (msg := r.check(view)) is not None:
            raise FlagError(msg)


def _hcp(v) -> tuple | None:
    hcp = v.hierarchical_context_parallel_sizes
    return tuple(hcp) if hcp else None


# ----------------------------------------------------------------------------- CP and the method
@rule(DRIVER)
def cp_needs_method(v):
    if v.context_parallel_size != 1 and v.seqpar_method is None:
        return ("--context-parallel-size > 1 needs --seqpar-method (megatron-core's local "
                "attention is CP=1 only)")


@rule(MEGATRON_LM)
def no_te_cp_comm_type(v):
    ok = (None, "p2p", ["p2p"]) + (("a2a+p2p", ["a2a+p2p"]) if _hcp(v) else ())
    if v.cp_comm_type not in ok:
        return (f"--cp-comm-type {v.cp_comm_type} selects Transformer Engine's "
                f"context-parallel attention, which --seqpar-method {v.seqpar_method} "
                "replaces; drop --cp-comm-type")


# ----------------------------------------------------------------------------- two levels
@rule(DRIVER)
def two_level_needs_method(v):
    if _hcp(v) and v.seqpar_method is None:
        return ("--hierarchical-context-parallel-sizes U R needs --seqpar-method (two-level "
                "sequence parallelism: heads over U, the method over R)")


@rule(*BOTH)
def two_level_sizes(v):
    hcp, cp = _hcp(v), v.context_parallel_size
    if hcp and not (len(hcp) == 2 and all(x > 0 for x in hcp) and hcp[0] * hcp[1] == cp):
        return (f"--hierarchical-context-parallel-sizes {' '.join(map(str, hcp))}: give two "
                f"sizes U R with U*R = --context-parallel-size {cp}")


@rule(*BOTH)
def two_level_heads(v):
    hcp, heads = _hcp(v), v.num_attention_heads
    if hcp and heads is not None and hcp[0] > 0:
        per_tp = heads // v.tensor_model_parallel_size
        if per_tp % hcp[0]:
            return (f"--hierarchical-context-parallel-sizes: U={hcp[0]} does not divide the "
                    f"{per_tp} query heads per TP rank; choose U dividing them")


@rule(*BOTH)
def two_level_head_parallel(v):
    hcp, given = _hcp(v), v.options.get("head_parallel")
    if hcp and given not in (None, hcp[0]):
        return (f"--seqpar-head-parallel {given} disagrees with "
                f"--hierarchical-context-parallel-sizes {' '.join(map(str, hcp))}; give one "
                "of them")


# ----------------------------------------------------------------------------- documents
@rule(*BOTH)
def documents_are_gpt(v):
    if v.model != "gpt" and (v.reset_attention_mask or v.reset_position_ids or v.eod_mask_loss):
        return ("--reset-attention-mask, --reset-position-ids and --eod-mask-loss are GPT "
                "flags (documents end at EOD); drop them for BERT")


@rule(DRIVER)
def documents_need_method(v):
    if v.reset_attention_mask and v.seqpar_method is None:
        return ("--reset-attention-mask packs documents into cu_seqlens, which megatron-core's "
                "local attention cannot take without a dense mask; add --seqpar-method (any "
                "method, CP=1 too)")


@rule(MEGATRON_LM)
def documents_without_dense_mask(v):
    if v.reset_attention_mask and v.create_attention_mask_in_dataloader:
        return (f"--reset-attention-mask with --seqpar-method {v.seqpar_method}: the documents "
                "reach attention as cu_seqlens (a packed THD stream), so pass "
                "--no-create-attention-mask-in-dataloader (no dense S x S mask is needed)")


@rule(*BOTH)
def documents_vs_lss_owned_rows(v):
    if (v.seqpar_method == "lss" and (v.reset_attention_mask or v.reset_position_ids)
            and v.options.get("assemble_position_grads") is False):
        return ("--no-seqpar-lss-assemble-position-grads owns position rows per CP segment, "
                "but with --reset-attention-mask / --reset-position-ids a segment's positions "
                "are not its own rows; drop --no-seqpar-lss-assemble-position-grads")


@rule(*BOTH)
def balanced_packs_documents(v):
    if v.seqpar_packing == "balanced" and not v.reset_attention_mask:
        return ("--seqpar-packing balanced places packed documents over the CP ranks; add "
                "--reset-attention-mask (documents end at EOD) or drop --seqpar-packing")


def rope_in_provider(v) -> bool:
    """Whether our core attention rotates q and k (``megatron.rope``) and the model is built
    without megatron-core's RoPE: RoPE under the balanced packing, whose layout megatron-core's
    THD rotation does not know (it assumes zigzag)."""
    return v.seqpar_packing == "balanced" and v.position_embedding_type == "rope"


@rule(*BOTH)
def balanced_positions(v):
    if v.seqpar_packing != "balanced" or v.position_embedding_type == "learned_absolute":
        return None
    if v.position_embedding_type != "rope":
        return (f"--seqpar-packing balanced with --position-embedding-type "
                f"{v.position_embedding_type}: not yet; use learned_absolute or rope, or "
                "--seqpar-packing zigzag")
    if v.multi_latent_attention:
        return ("--seqpar-packing balanced with --multi-latent-attention: not yet (MLA rotates "
                "inside its own attention module, which assumes the zigzag layout); use "
                "--seqpar-packing zigzag")
    return None


@rule(*BOTH)
def documents_vs_sequence_parallel(v):
    if v.reset_attention_mask and v.sequence_parallel:
        return ("--reset-attention-mask with --sequence-parallel: the packed stream's length "
                "varies by step and need not divide by TP; drop --sequence-parallel")


@rule(MEGATRON_LM)
def documents_vs_pipeline(v):
    if v.reset_attention_mask and v.pipeline_model_parallel_size != 1:
        return ("--reset-attention-mask with --seqpar-method packs each micro-batch into a "
                "stream whose length varies, which pipeline stages cannot exchange; use "
                "--pipeline-model-parallel-size 1")


@rule(MEGATRON_LM)
def no_hybrid_context_parallel(v):
    if v.hybrid_context_parallel:
        return "--hybrid-context-parallel (packed THD batches) is not supported; drop it"


@rule(MEGATRON_LM)
def no_sft(v):
    if v.sft:
        return ("--sft feeds packed THD sequences through Megatron-LM's SFT batch path "
                "(Transformer Engine's partitioning), which the patched scripts do not route "
                "to megatron_seqpar.megatron.thd yet; pretrain without --sft (packed "
                "documents: --reset-attention-mask)")


# ----------------------------------------------------------------------------- the attention
@rule(*BOTH)
def no_attention_dropout(v):
    if v.seqpar_method is not None and v.attention_dropout:
        return (f"--attention-dropout {v.attention_dropout}: the exact methods run without "
                "attention dropout; pass --attention-dropout 0")


@rule(*BOTH)
def bert_positions(v):
    if v.model == "bert" and v.position_embedding_type != "learned_absolute":
        return "BERT supports --position-embedding-type learned_absolute only"


@rule(MEGATRON_LM)
def no_spec(v):
    if v.spec:
        return (f"--spec and --seqpar-method both choose the layer spec; keep --seqpar-method "
                f"{v.seqpar_method} and drop --spec (or keep --spec megatron_seqpar.specs "
                f"{v.model}_{v.seqpar_method} and drop --seqpar-method)")


def _refuse(name: str, message: str) -> None:
    """A Megatron-LM feature the provider does not take: set means refused."""
    def check(v):
        return message if getattr(v, name) else None

    check.__name__ = f"no_{name}"
    rule(MEGATRON_LM)(check)


_refuse("use_legacy_models", "--use-legacy-models has no layer specs; drop it")
_refuse("experimental_attention_variant",
        "--experimental-attention-variant is not supported; drop it")
_refuse("heterogeneous_layers_config_path",
        "--heterogeneous-layers-config-path is not supported; drop it")
_refuse("mtp_num_layers", "--mtp-num-layers is not supported; drop it")


@rule(*BOTH)
def mla_is_gpt(v):
    if v.multi_latent_attention and v.model != "gpt":
        return "--multi-latent-attention is for GPT; drop it for BERT"


@rule(DRIVER)
def mla_needs_method(v):
    if v.multi_latent_attention and v.seqpar_method is None:
        return ("--multi-latent-attention needs --seqpar-method: megatron-core's local attention "
                "takes no separate V head dim, our provider runs MLA at every CP size")


@rule(MEGATRON_LM)
def transformer_impl_known(v):
    if v.transformer_impl not in ("local", "transformer_engine"):
        return (f"--transformer-impl {v.transformer_impl} is not supported; use local or "
                "transformer_engine")


@rule(MEGATRON_LM)
def transformer_engine_installed(v):
    if v.transformer_impl == "transformer_engine" and "transformer_engine" not in v.installed:
        return ("--transformer-impl transformer_engine (Megatron-LM's default) needs "
                "transformer_engine, which is not installed; pass --transformer-impl local")


@rule(MEGATRON_LM)
def local_gradient_fusion_needs_apex(v):
    if (v.transformer_impl == "local" and v.gradient_accumulation_fusion
            and "fused_weight_gradient_mlp_cuda" not in v.installed):
        return ("--transformer-impl local with gradient accumulation fusion needs APEX's "
                "fused_weight_gradient_mlp_cuda; pass --no-gradient-accumulation-fusion")


@rule(MEGATRON_LM)
def local_persistent_norm_needs_apex(v):
    if v.transformer_impl == "local" and v.persist_layer_norm and "apex" not in v.installed:
        return ("--transformer-impl local without APEX uses torch's LayerNorm, which has no "
                "persistent kernel; pass --no-persist-layer-norm")


# ----------------------------------------------------------------------------- LSS's gradients
@rule(*BOTH)
def lss_owned_rows_vs_distributed_optimizer(v):
    if (v.seqpar_method == "lss" and v.use_distributed_optimizer
            and v.options.get("assemble_position_grads") is False):
        return ("--seqpar-method lss with --use-distributed-optimizer reduce-scatters whole "
                "gradients over the sequence group, which assembles position-embedding rows; "
                "drop --no-seqpar-lss-assemble-position-grads")


@rule(MEGATRON_LM)
def lss_gradient_reduction(v):
    """Without the distributed optimizer LSS re-points DDP to the pure DP group and averages
    over CP in finalize (``megatron.lss_grad``); with it, the two levels are Megatron's own
    distributed-optimizer instances: one instance per DP replica, sharded over its CP group
    (reduce-scatter over the sequence group, then all-reduce of the shard over DP)."""
    if v.seqpar_method != "lss":
        return None
    if not v.use_distributed_optimizer:
        if v.num_distributed_optimizer_instances != 1:
            return "--seqpar-method lss needs --num-distributed-optimizer-instances 1"
        return None
    dp = v.data_parallel_size
    if v.num_distributed_optimizer_instances != dp:
        return (f"--seqpar-method lss with --use-distributed-optimizer averages over the "
                f"sequence group first, then over DP={dp}, through Megatron's distributed-"
                f"optimizer instances (one per DP replica, sharded over its CP group): pass "
                f"--num-distributed-optimizer-instances {dp}")
