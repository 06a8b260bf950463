# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Both create the virtualenv on first use (idempotent: re-runs only when the
# dependency files change).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[torch,test,tfds]'
	@touch $(STAMP)

# Test files run in parallel, one file per worker (module-scoped compiled fixtures stay shared within
# a file). TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The edit loop (~2 minutes here): ruff, tests/unit (ops, data, evaluation, conv paths: no detector trained, no
# train.py subprocess) and the docs checks. `make test` stays the whole suite (and CI's command);
# docs/testing.md says what each folder holds.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit tests/docs/test_docs.py

demo: $(STAMP)
	$(PY) -m maskx_jax.demo --workdir runs/demo

# maskx_jax vs torchvision (speed, compile, memory, FLOPs), the large-vocabulary mask branch, then the
# training step's convolutions one by one, the host input pipeline alone, and where the training step's peak
# memory goes. Tables: benchmarks/results/*.md. Measure on a quiet machine: every figure is a wall-clock
# measurement.
# Every benchmark process gets glibc's transparent-huge-page advice (benchmarks/common.py says why).
HUGEPAGES := GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

bench: $(STAMP)
	$(HUGEPAGES) $(PY) benchmarks/run.py
	$(HUGEPAGES) $(PY) benchmarks/large_vocab.py
	$(HUGEPAGES) $(PY) benchmarks/conv_layers.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/train_memory.py

clean:
	rm -rf $(VENV) runs
