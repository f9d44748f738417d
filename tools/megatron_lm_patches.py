#!/usr/bin/env python3
"""Check, apply or revert megatron-seqpar's patches on a Megatron-LM checkout.

    python tools/megatron_lm_patches.py --check  [MEGATRON_LM_DIR]
    python tools/megatron_lm_patches.py --apply  [MEGATRON_LM_DIR] [--only gpt|bert]
    python tools/megatron_lm_patches.py --revert [MEGATRON_LM_DIR] [--only gpt|bert]

MEGATRON_LM_DIR defaults to $MEGATRON_LM_PATH. The patches (``patches/megatron_lm_*.diff``)
target tag ``core_v0.16.1`` and are applied with GNU ``patch -p1 --fuzz=0``: a hunk that does
not match exactly fails instead of landing in the wrong place. Each patch is in one of three
states: ``applicable`` (applies cleanly), ``applied`` (reverses cleanly) or ``conflict``.
``--check`` changes nothing and exits 0 when no patch is in conflict; ``--apply`` applies
the applicable ones (idempotent), ``--revert`` reverses the applied ones. Exit status 1 on a
conflict, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent.parent / "patches"
PATCHES = {"gpt": "megatron_lm_gpt.diff", "bert": "megatron_lm_bert.diff"}
TARGET_VERSION = "0.16.1"


def _patch(root: Path, diff: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["patch", "-p1", "--batch", "--fuzz=0", "--silent", "--no-backup-if-mismatch",
           "--reject-file=-", "-d", str(root), "-i", str(diff), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def state(root: Path, diff: Path) -> str:
    """``applicable``, ``applied`` or ``conflict`` (nothing is changed)."""
    if _patch(root, diff, "--dry-run", "--forward").returncode == 0:
        return "applicable"
    if _patch(root, diff, "--dry-run", "--reverse").returncode == 0:
        return "applied"
    return "conflict"


def megatron_core_version(root: Path) -> str | None:
    """``megatron/core/package_info.py``'s version of the checkout, or None."""
    info = root / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        return None
    text = info.read_text()
    parts = [re.search(rf"^{k}\s*=\s*(\S+)", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return ".".join(p.group(1).strip("'\"") for p in parts)


def run(action: str, root: Path, names: list[str], out=sys.stdout) -> int:
    """Do ``action`` (check/apply/revert) for the named patches; returns the exit status."""
    if shutil.which("patch") is None:
        print("error: GNU patch is not installed (apt-get install patch)", file=out)
        return 2
    if not (root / "pretrain_gpt.py").is_file():
        print(f"error: {root} has no pretrain_gpt.py; pass a Megatron-LM checkout "
              "(or set MEGATRON_LM_PATH)", file=out)
        return 2
    version = megatron_core_version(root)
    if version != TARGET_VERSION:
        print(f"warning: {root} is megatron-core {version}, the patches target "
              f"core_v{TARGET_VERSION}", file=out)
    status = 0
    for name in names:
        diff = PATCH_DIR / PATCHES[name]
        now = state(root, diff)
        if action == "apply" and now == "applicable":
            res = _patch(root, diff, "--forward")
            now = "applied" if res.returncode == 0 else f"conflict ({res.stdout.strip()})"
        elif action == "revert" and now == "applied":
            res = _patch(root, diff, "--reverse")
            now = "applicable" if res.returncode == 0 else f"conflict ({res.stdout.strip()})"
        print(f"{diff.name}: {now}", file=out)
        if now.startswith("conflict"):
            status = 1
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    for flag in ("--check", "--apply", "--revert"):
        action.add_argument(flag, action="store_const", dest="action", const=flag[2:])
    parser.add_argument("root", nargs="?", default=os.environ.get("MEGATRON_LM_PATH"),
                        help="Megatron-LM checkout (default: $MEGATRON_LM_PATH)")
    parser.add_argument("--only", choices=sorted(PATCHES), action="append",
                        help="restrict to one patch (repeatable; default: all)")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("give the Megatron-LM checkout or set MEGATRON_LM_PATH")
    return run(args.action, Path(args.root), args.only or list(PATCHES))


if __name__ == "__main__":
    sys.exit(main())
