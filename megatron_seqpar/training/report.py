"""Run reporting: JSON-lines log, tqdm progress bar and the loss / throughput plot.

Log format (``LOG_DIR/train_log.jsonl``, written by global rank 0): the first line is
``{"event": "start", "config": {...}, "device": ..., "substitutions": [...]}``; then one line
per step ``{"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s",
"peak_mem_bytes": [per rank], "sent_bytes": [per rank]}`` (``sent_bytes``: bytes this rank's
sequence-parallel attention sent during the step, forward and backward, from
``megatron_seqpar.comm.count_traffic``; gradient all-reduces are not counted). With
``--reset-attention-mask`` a step record adds ``"packed_tokens"``: the global batch's packed
stream slots, real tokens plus the pads that round each document piece up. A resumed run
drops lines past its start step and appends. The plot (``LOG_DIR/train_curves.png``) shows loss
and tokens/s against step.
"""

from __future__ import annotations

import json
import os

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "train_curves.png"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


class JsonlLog:
    """Append-only JSON-lines log; ``resume_from=k`` keeps only step records <= k."""

    def __init__(self, path: str, resume_from: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_from is not None and os.path.exists(path):
            keep = [r for r in read_log(path) if r.get("step", 0) <= resume_from]
            with open(path, "w") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")
        elif os.path.exists(path):
            os.remove(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(path: str) -> list[dict]:
    """The per-step records of a log, the last one of each step (a resumed run rewrites)."""
    by_step = {}
    for r in read_log(path):
        if "step" in r and "loss" in r:
            by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def plot(log_path: str, out_path: str, title: str = "") -> str:
    """Write the loss and tokens/s curves of ``log_path`` to ``out_path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = step_records(log_path)
    steps = [r["step"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["loss"] for r in recs], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["tokens_per_s"] for r in recs], lw=1, color="tab:orange")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens / s")
    ax2.set_title("throughput")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def summary(log_path: str, window: int = 20) -> dict:
    """First/last ``window``-step mean loss, their relative drop, mean tokens/s (and mean
    packed stream slots per step with ``--reset-attention-mask``, else None)."""
    recs = step_records(log_path)
    losses = [r["loss"] for r in recs]
    w = max(1, min(window, len(losses) // 2))
    first, last = sum(losses[:w]) / w, sum(losses[-w:]) / w
    tps = [r["tokens_per_s"] for r in recs[1:]] or [recs[0]["tokens_per_s"]]
    packed = [r["packed_tokens"] for r in recs if "packed_tokens" in r]
    return {"packed_tokens_per_step": sum(packed) / len(packed) if packed else None,
            "steps": len(recs), "window": w, "first_mean": first, "last_mean": last,
            "drop": 1 - last / first, "tokens_per_s": sum(tps) / len(tps),
            "peak_mem_bytes": max(max(r["peak_mem_bytes"]) for r in recs),
            "sent_bytes_per_step": max(max(r["sent_bytes"]) for r in recs)}
