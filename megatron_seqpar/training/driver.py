"""The pretraining loop: ``main(argv, model)`` for torchrun, ``train(cfg)`` inside a process group.

One process per rank (``torchrun --nproc-per-node N``): gloo on CPU, NCCL on CUDA. Groups come
from megatron-core's ``parallel_state.initialize_model_parallel(TP, 1, CP)``
(``--hierarchical-context-parallel-sizes U R``: also its hierarchical CP groups, which the
two-level core attention uses); nothing is built ad hoc. Per step, for each micro-batch of
this data-parallel rank: read the full sample, cut it to this CP rank's zigzag shard, run the
model (per-token losses), and back-propagate
``sum(local token losses) * (DP*CP) / N`` where N is the global number of loss tokens of the step
(one all-reduce of the counts over the data x context group). Megatron's DDP then averages over
the DP x CP ranks (``finalize_model_grads``; LSS: sequence group then DP group), so the gradient
is exactly that of the mean loss over every token of the global batch, as for CP=1. The logged
loss is the same quantity (local sums all-reduced over DP x CP, divided by N).

Optimizer: on CUDA megatron-core's ``get_megatron_optimizer`` (Adam, fp32 master weights,
clipping); on CPU ``torch.optim.AdamW`` on DDP's ``main_grad`` with the same decay rules
(no weight decay on biases and norms) and global-norm clipping (see ``SUBSTITUTIONS``).
Learning rate: linear warmup then constant / linear / cosine decay to ``--min-lr``
(Megatron's ``OptimizerParamScheduler`` formulas), set each step on both paths.
LSS: by default (``assemble_position_grads``) every CP rank holds the full gradient of every
position-embedding row, so both optimizers clip and save exactly as for the other methods. With
``--no-seqpar-lss-assemble-position-grads`` (rows owned per segment) the CPU clip sums the
position-embedding gradient norm over the CP group and a save first assembles the tables and
their moments from the owners; megatron-core's optimizer on CUDA sums no split norm and saves
CP rank 0's moments, so there that variant's clipping norm is per-rank (use --clip-grad 0) and
its resumed moments hold stale rows (not measured: no GPU run yet).

Documents (``--reset-attention-mask``, GPT): each micro-batch is one packed THD stream
(``training.data.pack_documents``) passed with ``PackedSeqParams(qkv_format="thd")``; the
core attention takes its cu_seqlens, no mask is built. Loss tokens exclude the pads, so the
normalisation above is unchanged.

Activation recompute (``--recompute-granularity``) is megatron-core's own; the seqpar core
attention keeps its output across the recompute where the method supports it (LightSeq's
rematerialization-aware checkpointing, ``megatron_seqpar.megatron.checkpointing``).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_seqpar import flag_rules
from megatron_seqpar.comm import count_traffic, free_port
from megatron_seqpar.megatron.lss_grad import (
    assemble_owned_rows,
    position_embedding_params,
    sync_position_embeddings,
)
from megatron_seqpar.megatron.thd import packed_seq_params
from megatron_seqpar.training import checkpoint, preflight, report
from megatron_seqpar.training import data as data_mod
from megatron_seqpar.training.arguments import (
    ConfigError,
    TrainConfig,
    document_unit,
    parse_args,
)
from megatron_seqpar.training.model import build_model, unwrap

# What a CPU run uses instead of megatron-core's CUDA-only pieces (recorded in the run's log).
SUBSTITUTIONS = (
    "optimizer: torch.optim.AdamW on DDP main_grad (megatron FP32Optimizer allocates on cuda)",
    "gradient clipping by the driver over DDP main_grad (global norm across ranks)",
    "weights: TransformerConfig(use_cpu_initialization=True)",
    "attention mask/position ids passed explicitly (megatron default causal mask is on cuda)",
)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based), Megatron's warmup + decay formulas."""
    if cfg.lr_warmup_iters and step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    span = max(1, cfg.train_iters - cfg.lr_warmup_iters)
    ratio = min(1.0, (step - cfg.lr_warmup_iters) / span)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


class _CpuOptimizer:
    """``torch.optim.AdamW`` over DDP's ``main_grad`` with Megatron-style global-norm clipping."""

    def __init__(self, cfg: TrainConfig, model, tp_group, split=(), cp_group=None):
        """``split``: params whose gradient rows are spread over ``cp_group`` (LSS position
        embeddings: each rank holds only its own rows' gradient), summed there for the norm."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        params = [p for p in model.parameters() if p.requires_grad]
        split_ids = {id(p) for p in split}
        self.split = [id(p) in split_ids for p in params]
        self.cp_group = cp_group
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        self.params, self.tp_group, self.clip = params, tp_group, cfg.clip_grad
        self.counted = [param_is_not_tensor_parallel_duplicate(p) for p in params]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    @property
    def param_groups(self):
        return self.opt.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> float:
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        sq = torch.zeros(2, dtype=torch.float64)  # [whole grads, grads split over CP]
        for p, counted, split in zip(self.params, self.counted, self.split):
            if counted:
                sq[int(split)] += p.grad.double().pow(2).sum()
        if any(self.split) and self.cp_group is not None and self.cp_group.size() > 1:
            dist.all_reduce(sq[1:], group=self.cp_group)
        if self.tp_group is not None and self.tp_group.size() > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = float(sq.sum().sqrt())
        if self.clip and self.clip > 0 and norm > self.clip:
            for p in self.params:
                p.grad.mul_(self.clip / (norm + 1e-6))
        self.opt.step()
        return norm

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)

    def sharded_state_dict(self, model_sd, is_loading=False, rows_from_owners=None):
        return checkpoint.torch_optimizer_sharded_state(self.opt, model_sd, is_loading,
                                                        rows_from_owners)

    def load_sharded_state_dict(self, loaded) -> None:
        checkpoint.load_torch_optimizer_state(self.opt, loaded)


class _CudaOptimizer:
    """megatron-core's optimizer (``get_megatron_optimizer``) behind the same small interface."""

    def __init__(self, cfg: TrainConfig, model):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        oc = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                             weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
                             adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                             clip_grad=cfg.clip_grad, bf16=cfg.bf16,
                             use_distributed_optimizer=cfg.use_distributed_optimizer,
                             params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        self.opt = get_megatron_optimizer(oc, [model], use_gloo_process_groups=False)

    @property
    def param_groups(self):
        return self.opt.param_groups

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self) -> float:
        _, norm, _ = self.opt.step()
        return float(norm or 0.0)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)

    def sharded_state_dict(self, model_sd, is_loading=False, rows_from_owners=None):
        """megatron-core's own sharded optimizer state. Not handled here: the owned LSS
        variant's position-embedding moments (rows spread over CP ranks) resume from CP rank
        0's copy (the default, assembled variant keeps them equal on every CP rank)."""
        return self.opt.sharded_state_dict(model_sd, is_loading=is_loading)

    def load_sharded_state_dict(self, loaded) -> None:
        self.opt.load_state_dict(loaded)


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says at which step and what to do."""


def _peak_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _stream_slots(batch) -> int:
    """Tokens of the micro-batch's full packed stream, pads included (0 when not packed)."""
    cu = batch.get("cu_seqlens_padded")
    return 0 if cu is None else int(cu[-1])


def _forward(cfg: TrainConfig, model, batch):
    """Per-token losses ``[b, s_local]`` of one micro-batch shard."""
    if cfg.model == "gpt":
        mask = None
        if cfg.attention_method is None:  # Megatron's local attention: explicit causal mask
            s = batch["tokens"].size(1)
            mask = torch.ones(s, s, dtype=torch.bool, device=batch["tokens"].device).triu(1)
            mask = mask[None, None]
        packed = None
        if "cu_seqlens_padded" in batch:  # --reset-attention-mask: one THD stream, no mask
            packed = packed_seq_params(batch["cu_seqlens"], batch["cu_seqlens_padded"],
                                       int(batch["max_seqlen"][0]), cfg.seqpar_packing)
        return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"],
                     packed_seq_params=packed)
    out = model(batch["tokens"], batch["padding_mask"], lm_labels=batch["labels"])
    return out[0] if isinstance(out, tuple) else out  # BertModel: (lm loss, binary logits)


def train(cfg: TrainConfig, *, device: str | None = None, quiet: bool = False) -> list[float]:
    """Run ``cfg`` inside an initialised default process group; returns this run's losses.

    Builds and tears down megatron-core's parallel state (also on error). On CPU the caller
    applies megatron-core's CPU workarounds (``megatron_seqpar.cpu_workarounds``; ``main`` does
    on CPU).
    """
    from megatron.core import parallel_state as ps

    device = device or cfg.resolved_device()
    if dist.get_world_size() != cfg.world_size:
        raise ConfigError(f"config says world size {cfg.world_size}, the process group has "
                          f"{dist.get_world_size()}")
    ps.initialize_model_parallel(cfg.tensor_model_parallel_size, 1,
                                 context_parallel_size=cfg.context_parallel_size,
                                 hierarchical_context_parallel_sizes=(
                                     list(cfg.hierarchical_context_parallel_sizes or ()) or None),
                                 create_gloo_process_groups=False,
                                 num_distributed_optimizer_instances=cfg.optimizer_instances,
                                 distributed_timeout_minutes=cfg.distributed_timeout_minutes)
    try:
        rank = dist.get_rank()
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        cp_group = ps.get_context_parallel_group()
        dpcp_size = dp_cp.size()
        model, _, finalize = build_model(cfg, device)
        module = unwrap(model)
        if device == "cuda":
            opt = _CudaOptimizer(cfg, model)
        else:
            split = ()
            if _lss_owned_rows(cfg, cp_group):
                split = position_embedding_params(module)
            opt = _CpuOptimizer(cfg, model, ps.get_tensor_model_parallel_group(), split,
                                cp_group)
        start = 0
        if cfg.load:
            start, extra = checkpoint.load_checkpoint(cfg.load, module, opt)
            note = _layout_note(extra.get("layout"), _layout(cfg), start)
            if rank == 0 and start:
                print(note or f"resuming from step {start} of {cfg.load}", flush=True)
        prefix = data_mod.prepare_data_prefix(cfg)
        dataset = data_mod.build_train_dataset(cfg, prefix)
        source = data_mod.BatchSource(dataset, cfg, ps.get_data_parallel_rank(), cp_group, device)

        log_dir = cfg.resolved_log_dir()
        log_path = os.path.join(log_dir, report.LOG_NAME)
        log = None
        if rank == 0:
            log = report.JsonlLog(log_path, resume_from=start if start else None)
            log.write({"event": "start", "step0": start, "device": device,
                       "world_size": cfg.world_size, "config": cfg.to_dict(),
                       "substitutions": list(SUBSTITUTIONS) if device == "cpu" else []})
        end = cfg.train_iters if cfg.exit_interval is None else min(cfg.train_iters,
                                                                    cfg.exit_interval)
        bar = None
        if rank == 0 and cfg.progress_bar and not quiet:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train_iters, initial=start, unit="step", dynamic_ncols=True,
                       desc=f"{cfg.model}/{cfg.seqpar_method or 'local'} "
                       f"CP={cfg.context_parallel_size}")
        losses = []
        model.train()
        for step in range(start, end):
            t0 = time.perf_counter()
            batches = [source.get(step, m) for m in range(cfg.num_microbatches)]
            # [loss tokens, packed stream slots (each CP rank adds its share of the stream)]
            counts = torch.tensor([float(sum(b["loss_mask"].sum() for b in batches)),
                                   sum(_stream_slots(b) for b in batches) / cp_group.size()],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(counts, group=dp_cp)
            n_tokens = float(counts[0])
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            model.zero_grad_buffer()
            opt.zero_grad()
            local_sum = torch.zeros((), dtype=torch.float64, device=device)
            with count_traffic() as traffic:
                for m, batch in enumerate(batches):
                    sync = model.no_sync() if m < len(batches) - 1 else nullcontext()
                    with sync:
                        tok_losses = _forward(cfg, model, batch)
                        s = (tok_losses.double() * batch["loss_mask"].double()).sum()
                        (s * (dpcp_size / max(n_tokens, 1.0))).backward()
                    local_sum += s.detach().double()
                finalize([model])
            dist.all_reduce(local_sum, group=dp_cp)
            loss = float(local_sum) / max(n_tokens, 1.0)
            if not math.isfinite(loss):  # every rank sees the same all-reduced value
                last = checkpoint.latest_step(cfg.save) if cfg.save else None
                kept = (f"the last good checkpoint is step {last} in {cfg.save}"
                        if last is not None else "no checkpoint was saved")
                raise TrainingStopped(
                    f"loss is {loss} at step {step + 1}; stopped before applying it ({kept}); "
                    "lower --lr, raise --lr-warmup-iters or set --clip-grad, then resume")
            grad_norm = opt.step()
            dt = time.perf_counter() - t0
            stats = torch.tensor([float(_peak_memory(device)), float(traffic.sent_bytes)],
                                 dtype=torch.float64, device=device)
            gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, stats)
            losses.append(loss)
            if rank == 0:
                rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "step_time_s": dt, "tokens_per_s": cfg.tokens_per_step / dt,
                       "peak_mem_bytes": [int(x[0]) for x in gathered],
                       "sent_bytes": [int(x[1]) for x in gathered]}
                if cfg.reset_attention_mask:  # real tokens / packed slots (with padding)
                    rec["packed_tokens"] = round(float(counts[1]))
                log.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    mem=report.human_bytes(max(rec["peak_mem_bytes"])),
                                    sent=report.human_bytes(max(rec["sent_bytes"])),
                                    refresh=False)
                    bar.update(1)
            done = step + 1
            if cfg.save and ((cfg.save_interval and done % cfg.save_interval == 0)
                             or done == end):
                _save(cfg, done, model, module, opt, cp_group)
        if bar is not None:
            bar.close()
        if rank == 0 and not quiet:
            _finish(cfg, log_path, log_dir)
        return losses
    finally:
        ps.destroy_model_parallel()


def _layout(cfg) -> dict:
    return {"world_size": cfg.world_size, "tp": cfg.tensor_model_parallel_size,
            "cp": cfg.context_parallel_size, "seqpar_method": cfg.seqpar_method}


def _layout_note(saved: dict | None, now: dict, step: int) -> str | None:
    """The line that says a checkpoint is loaded into another layout (None: the same one)."""
    if not saved or saved == now:
        return None

    def show(x):
        return (f"TP={x['tp']} CP={x['cp']} {x['seqpar_method'] or 'local attention'} "
                f"(world {x['world_size']})")

    return (f"resuming step {step} saved with {show(saved)} as {show(now)}: dist_checkpointing "
            "reshards the model and optimizer state; the attention methods add no parameters")


def _lss_owned_rows(cfg, cp_group) -> bool:
    """LSS at CP>1 with position-embedding rows owned per segment
    (``--no-seqpar-lss-assemble-position-grads``): its clipping norm and saves need help."""
    return (cfg.seqpar_method == "lss" and cp_group.size() > 1
            and not cfg.method_options().assemble_position_grads)


def _save(cfg, step, model, module, opt, cp_group) -> None:
    spread = None
    if _lss_owned_rows(cfg, cp_group):
        sync_position_embeddings(module, cp_group, cfg.seq_length)
        spread = (position_embedding_params(module),
                  lambda t: assemble_owned_rows(t, cp_group, cfg.seq_length))
    checkpoint.save_checkpoint(cfg.save, step, module, opt, extra={"layout": _layout(cfg)},
                               model_meta=preflight.model_signature(cfg),
                               rows_from_owners=spread)


def _finish(cfg, log_path: str, log_dir: str) -> None:
    s = report.summary(log_path)
    png = None
    if cfg.plot:
        png = report.plot(log_path, os.path.join(log_dir, report.PLOT_NAME),
                          title=f"byte-level {cfg.model.upper()} {cfg.num_layers}x"
                          f"{cfg.hidden_size}, seq {cfg.seq_length}, "
                          f"{cfg.seqpar_method or 'local'} CP={cfg.context_parallel_size}")
    w = s["window"]
    print(f"steps {s['steps']}: loss {s['first_mean']:.3f} (first {w} steps) -> "
          f"{s['last_mean']:.3f} (last {w}), {100 * s['drop']:.0f}% lower; "
          f"{s['tokens_per_s']:.0f} tokens/s; peak memory/rank "
          f"{report.human_bytes(s['peak_mem_bytes'])}; attention sent/step/rank "
          f"{report.human_bytes(s['sent_bytes_per_step'])}", flush=True)
    if s["packed_tokens_per_step"]:
        pads = s["packed_tokens_per_step"] / cfg.tokens_per_step - 1
        print(f"documents packed with {100 * pads:.2f}% pad tokens (pieces rounded up to a "
              f"multiple of {document_unit(cfg)})", flush=True)
    print(f"log:  {os.path.abspath(log_path)}", flush=True)
    if png:
        print(f"plot: {os.path.abspath(png)}", flush=True)


def _peer_failure(text: str, minutes: float) -> str | None:
    """What a distributed RuntimeError says happened to a peer (None: something else)."""
    low = text.lower()
    if "connection reset" in low or "connection closed" in low or "connection refused" in low:
        return "lost the connection to a peer rank (it died or was killed)"
    if "timed out" in low or "timeout" in low:
        return (f"a collective timed out after {minutes:g} min: a peer rank stalled (raise "
                "--distributed-timeout-minutes if it was only slow)")
    return None


def _init_process_group(cfg: TrainConfig, device: str) -> None:
    backend = cfg.resolved_backend()
    if "MASTER_ADDR" not in os.environ:  # plain `python pretrain_gpt.py`: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=cfg.distributed_timeout_minutes)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    # Under torchrun the workers share the agent's store across restarts (torch 2.13 adds no
    # per-attempt prefix), so a restarted group would read the dead group's gloo addresses and
    # fail to connect; keep each attempt's keys apart.
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(f"seqpar/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def inactive_line(cfg: TrainConfig) -> str | None:
    """What rank 0 prints when ``--seqpar-method`` is inactive (CP=1: megatron-core's local
    attention runs, ``TrainConfig.attention_method``), so a CP sweep keeps one command line."""
    if cfg.seqpar_method is not None and cfg.attention_method is None:
        return flag_rules.inactive_note(cfg.seqpar_method, "megatron-core's local attention")
    return None


def main(argv=None, model: str = "gpt", cpu_shims=None) -> int:
    """Entry point of ``examples/pretrain_{gpt,bert}.py`` and ``python -m
    megatron_seqpar.pretrain_{gpt,bert}`` (``main_gpt`` / ``main_bert``): parse, validate,
    init, train.

    ``cpu_shims``: a context-manager factory that makes megatron-core run on CPU; by default,
    and only when the device is the CPU, ``megatron_seqpar.cpu_workarounds.cpu_shims`` (a
    CUDA run never imports that module).
    """

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    try:
        cfg = parse_args(argv, model=model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cfg.resolved_device()
    if device == "cpu" and cpu_shims is None:  # imported here: never on a CUDA run
        from megatron_seqpar.cpu_workarounds import cpu_shims
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        note = preflight.check_inputs(cfg)  # files only: every rank reaches the same verdict
    except ConfigError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if note and rank0:
        print(note, flush=True)
    if rank0 and (line := inactive_line(cfg)):
        print(line, flush=True)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    _init_process_group(cfg, device)
    try:
        with cpu_shims() if device == "cpu" else nullcontext():
            train(cfg, device=device)
    except (ConfigError, checkpoint.CheckpointError, TrainingStopped) as e:
        if dist.get_rank() == 0:  # every rank stops; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, checkpoint.CheckpointError)) else 1
    except RuntimeError as e:  # a peer died, or a collective outlived the timeout
        what = _peer_failure(str(e), cfg.distributed_timeout_minutes)
        if what is None:
            raise
        print(f"error: rank {dist.get_rank()}: {what} ({str(e).splitlines()[0][:240]}); check "
              "the other ranks' logs; a job under torchrun --max-restarts resumes from --load",
              file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


def main_gpt() -> int:
    """``python -m megatron_seqpar.pretrain_gpt`` / ``megatron-seqpar-pretrain-gpt``."""
    return main(sys.argv[1:], model="gpt")


def main_bert() -> int:
    """``python -m megatron_seqpar.pretrain_bert`` / ``megatron-seqpar-pretrain-bert``."""
    return main(sys.argv[1:], model="bert")
