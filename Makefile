# The README's two commands: `make demo` (the main job) and `make test`. Both set up .venv
# from the pins in constraints.txt on first use, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
NPROC ?= 2

.PHONY: setup bytecode demo test test-torchrun lint bench-deps megatron-lm-deps clean

$(VENV)/.installed: constraints.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) torch megatron-core psutil einops tqdm matplotlib pytest ruff
	$(PY) -m pip install $(PIP_FLAGS) --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) examples/pretrain_gpt.py \
		--context-parallel-size $(NPROC) --seqpar-method lightseq

# Bytecode first: where PYTHONDONTWRITEBYTECODE is set (as on this machine) no process of the
# suite would write it, and each of its ~100 processes would compile the sources again.
bytecode: setup
	$(PY) -m compileall -q megatron_seqpar tests tools examples >/dev/null

test: bytecode
	$(PY) -m pytest -q --durations=15

test-torchrun: bytecode  # the suite under Megatron's runner: the NPROC pytest processes are the ranks
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m pytest -q tests

bench-deps: setup  # optional peers for tools/bench_attention.py (DeepSpeed-Ulysses)
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_FLAGS) deepspeed

megatron-lm-deps: setup  # what Megatron-LM's megatron.training imports beyond megatron-core
	$(PY) -m pip install $(PIP_FLAGS) six regex pyyaml triton pydantic

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
