"""What the gloo pool's fork server imports once, before it forks the pool's workers.

``distributed.py`` starts its workers with multiprocessing's ``forkserver`` method and this
module as the preload: the fork server imports torch, megatron-core (with its fused helpers
eager, as ``cpu_workarounds.import_megatron_core`` does in every CPU process of the suite) and
the parts of both that nearly every test call reaches, once; each worker is then a fork of it
instead of a fresh interpreter that imports them again (about 4 CPU s a worker on this machine,
ten workers a session). Nothing here runs a collective or starts a thread of its own
(importing torch leaves one native thread, which a fork does not copy: the reason PyTorch's
own fork-based workers may follow an import of torch).
"""

import importlib

from megatron_seqpar.cpu_workarounds import import_megatron_core

import_megatron_core()  # first: megatron-core's fused helpers eager
for _name in ("torch._dynamo",  # torch.optim imports it on an optimizer's first use
              "torch.distributed.checkpoint",
              "megatron.core.models.gpt.gpt_model",
              "megatron.core.models.bert.bert_model",
              "megatron_seqpar.training.driver",
              "distributed"):
    importlib.import_module(_name)
