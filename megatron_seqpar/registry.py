"""The methods: each module declares its ``METHOD`` (``megatron_seqpar.method.Method``) once,
and this list names the modules. A new method is its file plus one line here; ``METHODS``,
the CLI choices, the spec names, the benchmark lists and the tests' parametrisations all come
from ``REGISTRY``."""

from __future__ import annotations

from megatron_seqpar import lightseq, lss, mqsp, rsa
from megatron_seqpar.method import Method

REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (
    rsa,
    mqsp,
    lss,
    lightseq,
)}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sequence-parallel method {name!r}; use one of "
                         f"{METHODS}") from None
