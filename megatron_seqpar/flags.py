"""The ``--seqpar-*`` flags, defined once for our driver and for Megatron-LM's parser.

    --seqpar-method {rsa,mqsp,lss,lightseq}    attention on the context-parallel axis
    --seqpar-packing {zigzag,balanced}         CP layout of packed documents (with
                                               --reset-attention-mask; zigzag = TE's)
    --seqpar-backend NAME                      block-kernel backend (every method)
    --seqpar-<method>-<field> VALUE            a method's own option, e.g. --seqpar-mqsp-micro-q 4
    --[no-]seqpar-<method>-<bool field>        e.g. --no-seqpar-lightseq-balance

Built from the methods' frozen ``Options`` dataclasses (``megatron_seqpar.registry``). An
option flag left out keeps the dataclass default; a flag of another method is an error. What
the flags may be combined with is ``megatron_seqpar.flag_rules``.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_seqpar.api import method_options
from megatron_seqpar.flag_rules import PACKINGS
from megatron_seqpar.kernels import BACKEND_NAMES
from megatron_seqpar.method import BaseOptions
from megatron_seqpar.registry import METHODS

GROUP_TITLE = "megatron-seqpar"


class SeqParArgumentError(ValueError):
    """A ``--seqpar-*`` flag conflicts with the rest of the command line; names the fix."""


def _field_kind(f: dataclasses.Field):
    """``bool``/``int``/``float``/``str`` of an options field (annotations may be strings)."""
    if isinstance(f.default, bool):
        return bool
    if isinstance(f.default, (int, float, str)):
        return type(f.default)
    text = str(f.type)
    for kind in (bool, int, float):
        if kind.__name__ in text:
            return kind
    return str


def option_flags() -> list[tuple[str, str, str, dataclasses.Field]]:
    """``(flag, dest, method or "", field)`` for every options field; ``""`` = shared field."""
    shared = {f.name for f in dataclasses.fields(BaseOptions)}
    rows = [(f"--seqpar-{f.name.replace('_', '-')}", f"seqpar_{f.name}", "", f)
            for f in dataclasses.fields(BaseOptions)]
    for m in METHODS:
        for f in dataclasses.fields(method_options(m)):
            if f.name not in shared:
                rows.append((f"--seqpar-{m}-{f.name.replace('_', '-')}",
                             f"seqpar_{m}_{f.name}", m, f))
    return rows


def add_seqpar_args(parser):
    """Add ``--seqpar-method`` and every method option to ``parser`` (or an argument group).

    Given an ``ArgumentParser`` the flags go into a group titled ``megatron-seqpar``; given a
    group they go into it. Option flags default to ``None`` (= the dataclass default), so
    ``options_from_args`` can tell a flag that was given from one left out. Returns ``parser``.
    """
    group = parser
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group(title=GROUP_TITLE)
    group.add_argument("--seqpar-method", choices=METHODS, default=None,
                       help="exact sequence-parallel attention on the context-parallel axis "
                       "(needs --context-parallel-size > 1)")
    group.add_argument("--seqpar-packing", choices=PACKINGS, default="zigzag",
                       help="with --reset-attention-mask: how packed documents are cut over "
                       "the CP ranks; zigzag (Transformer Engine's: every document in 2*CP "
                       "chunks) or balanced (short documents whole on one rank, long ones "
                       "split, even causal work, no per-document padding; learned absolute "
                       "positions)")
    for flag, dest, method, f in option_flags():
        kind = _field_kind(f)
        where = f"--seqpar-method {method}" if method else "every --seqpar-method"
        text = f"{where}: Options.{f.name} (default {f.default!r})"
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        elif f.name == "backend":
            group.add_argument(flag, dest=dest, choices=BACKEND_NAMES, default=None, help=text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    return parser


def options_from_args(args):
    """The chosen method's frozen ``Options`` from the parsed flags, or None without a method.

    Raises ``SeqParArgumentError`` for an option flag of another method (or without a method)
    and when the dataclass rejects a value.
    """
    method = getattr(args, "seqpar_method", None)
    given, stray = {}, []
    for flag, dest, owner, f in option_flags():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if method is None or (owner and owner != method):
            stray.append(flag)
        else:
            given[f.name] = value
    if stray:
        need = "--seqpar-method" if method is None else f"the method they belong to (not {method})"
        raise SeqParArgumentError(f"{', '.join(stray)} given without {need}; drop them or "
                                  "choose that method")
    if method is None:
        return None
    try:
        return method_options(method)(**given)
    except (TypeError, ValueError) as e:
        raise SeqParArgumentError(f"--seqpar-method {method}: {e}") from None
