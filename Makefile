# Two commands do everything on a fresh clone:  make train  |  make test
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
RECIPE  ?= recipes/default.yaml
ARGS    ?=
# the tests on 2 pytest-xdist workers (docs/testing.md: what that buys on 2 cores); XDIST= runs them in one process
XDIST   ?= -n 2 --dist loadgroup
# keep DeepSpeed/torch extension builds inside the ignored project cache
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train lint test test-all faults bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	.venv/bin/dstlm fit --config $(RECIPE) $(ARGS)

lint: $(STAMP)
	.venv/bin/ruff check dstlm tests benchmarks slurm
	# the sparse core keeps every function simple: cyclomatic complexity at most 12 (and at most 40 lines:
	# tests/test_architecture.py)
	.venv/bin/ruff check --select C901 --config 'lint.mccabe.max-complexity=12' dstlm/sparse
	# and every function of dstlm at most 15 (configuration checks are small named validators)
	.venv/bin/ruff check --select C901 --config 'lint.mccabe.max-complexity=15' dstlm

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow" $(XDIST) --durations=20 $(ARGS)

test-all: $(STAMP) lint
	$(PY) -m pytest -q $(XDIST) --durations=20 $(ARGS)

# every fault-injection test, slow ones included (make test runs the non-slow ones): docs/faults.md
faults: $(STAMP)
	$(PY) -m pytest -q -m faults $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

clean:
	rm -rf runs .pytest_cache
