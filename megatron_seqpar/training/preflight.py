"""Checks of the run's files before any process group exists: one clear line per problem.

``check_inputs(cfg)`` runs on every rank (it only reads the file system, so every rank reaches
the same verdict) and raises ``InputError`` whose message names the problem and the fix; the
driver prints it as ``error: ...`` on rank 0 and exits non-zero on every rank. What it checks:

- ``--data-path``: an indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, or either file's
  name), a UTF-8 text file, or a directory of them. Text is built into the indexed format on
  first use (``text_prefix``: cached under ``--data-cache-path``, keyed by the files' names,
  sizes and times, like the default corpus). Missing, unreadable, binary or empty: refused.
- ``--load``: an absent or empty directory means a fresh start (``load_note`` says so, as
  Megatron-LM does); a damaged ``latest_checkpointed_iteration.txt``, a missing step directory
  or a checkpoint of another model shape (``model.json`` of the step, written at save) is
  refused, naming the file or the mismatched sizes.
- ``--save``: created if missing, and must be writable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from megatron_seqpar.training.arguments import ConfigError

MODEL_JSON = "model.json"  # model-defining flags of a checkpoint, beside its model/ directory
# The flags that decide the model's parameters (their shapes); anything else may change on load.
MODEL_FIELDS = ("model", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "max_position_embeddings", "position_embedding_type",
                "untie_embeddings_and_output_weights")
_SNIFF = 1 << 16  # bytes read to tell text from binary


class InputError(ConfigError):
    """A file or directory the run was given cannot be used; the message names the fix."""


def model_signature(cfg) -> dict:
    sig = {f: getattr(cfg, f) for f in MODEL_FIELDS}
    sig["max_position_embeddings"] = cfg.max_position_embeddings or cfg.seq_length
    return sig


# ---------------------------------------------------------------------------------- data
def data_kind(path: str) -> tuple[str, str | list[str]]:
    """``("indexed", prefix)`` or ``("text", [files])``; ``InputError`` otherwise."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"):
        for f in (path + ".bin", path + ".idx"):
            if not os.access(f, os.R_OK):
                raise InputError(f"--data-path {path}: {f} is not readable; fix its permissions")
        return "indexed", path
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        files = [f for f in files if not f.endswith((".bin", ".idx"))]
        if not files:
            raise InputError(f"--data-path {path}: the directory holds no text files; give a "
                             "directory of UTF-8 text files, a text file, or an indexed prefix")
    elif os.path.isfile(path):
        files = [path]
    else:
        hint = ""
        if os.path.exists(path + ".bin") or os.path.exists(path + ".idx"):
            hint = f" ({path}.bin and {path}.idx must both exist)"
        raise InputError(f"--data-path {path}: no such file, directory or indexed dataset"
                         f"{hint}; give a UTF-8 text file, a directory of them, or a prefix "
                         "built by tools/preprocess_data.py")
    for f in files:
        _check_text(f)
    return "text", files


def _check_text(path: str) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF)
    except OSError as e:
        raise InputError(f"--data-path: cannot read {path} ({e.strerror}); fix its "
                         "permissions or give another file") from None
    if b"\0" in head:
        raise InputError(f"--data-path: {path} is not text (it holds NUL bytes); give UTF-8 "
                         "text or an indexed dataset prefix (PREFIX for PREFIX.bin/.idx)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the sniff boundary
            raise InputError(f"--data-path: {path} is not UTF-8 text (byte {e.start}); "
                             "convert it (e.g. iconv -t utf-8)") from None
    if not head.strip():
        raise InputError(f"--data-path: {path} is empty; give a file with text in it")


def text_prefix(cfg, files: list[str]) -> str:
    """Where the indexed form of ``files`` is cached: a name from the first file, a key from
    every file's absolute path, size and modification time (an edited file is rebuilt)."""
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    stem = os.path.splitext(os.path.basename(os.path.normpath(files[0])))[0] or "text"
    level = "sentence" if cfg.model == "bert" else "document"
    return os.path.join(cfg.data_cache_path, "text", f"{stem}-{h.hexdigest()[:10]}_text_{level}")


# --------------------------------------------------------------------------- checkpoints
TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the last step's file


def iter_dir(root: str, step: int) -> str:
    """Step ``step``'s directory under ``root`` (Megatron-LM's ``iter_XXXXXXX``)."""
    return os.path.join(root, f"iter_{step:07d}")


def checkpoint_step(root: str) -> int | None:
    """The step ``root``'s tracker names (None: no checkpoint there); ``InputError`` if damaged."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    try:
        with open(tracker) as f:
            text = f.read().strip()
        step = int(text)
    except (OSError, ValueError, UnicodeDecodeError):
        raise InputError(f"--load {root}: {tracker} is damaged (expected a step number); "
                         "write the step of a complete iter_XXXXXXX directory into it, or "
                         "remove it to start fresh") from None
    if step < 0 or not os.path.isdir(os.path.join(iter_dir(root, step), "model")):
        raise InputError(f"--load {root}: {tracker} names step {step}, but "
                         f"{iter_dir(root, step)}/model is missing; fix the tracker to a "
                         "complete step or remove it to start fresh")
    return step


def check_model_matches(root: str, step: int, cfg) -> None:
    path = os.path.join(iter_dir(root, step), MODEL_JSON)
    if not os.path.exists(path):
        return  # saved before model.json existed: dist_checkpointing still checks shapes
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise InputError(f"--load {root}: {path} is damaged; restore it or start fresh") from None
    want = model_signature(cfg)
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (saved) vs {v} (this run)"
             for k, v in want.items() if saved.get(k) != v]
    if diffs:
        raise InputError(f"--load {root}: the checkpoint is of another model: "
                         + "; ".join(diffs) + "; use the saved model flags or another --load")


def load_note(cfg) -> str | None:
    """Checks ``--load``; returns the line to print when it means a fresh start."""
    if not cfg.load:
        return None
    if os.path.exists(cfg.load) and not os.path.isdir(cfg.load):
        raise InputError(f"--load {cfg.load} is a file; give the checkpoint directory "
                         "(the one that holds latest_checkpointed_iteration.txt)")
    step = checkpoint_step(cfg.load) if os.path.isdir(cfg.load) else None
    if step is None:
        return (f"no checkpoint in --load {cfg.load}: starting from step 0 (a fresh run, as "
                "Megatron-LM does)")
    check_model_matches(cfg.load, step, cfg)
    return None


def check_save(cfg) -> None:
    if not cfg.save:
        return
    try:
        os.makedirs(cfg.save, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cfg.save, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"--save {cfg.save} is not writable ({e.strerror}); give a directory "
                         "this user can write") from None


def check_inputs(cfg) -> str | None:
    """Every check above; returns a note for rank 0 to print (fresh start), if any."""
    if cfg.data_path:
        data_kind(cfg.data_path)
    note = load_note(cfg)
    check_save(cfg)
    return note
