# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package with what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The demo installs what it runs; the tests add their extras (torch, ...).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test format install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# On CPU, glibc's malloc would map and unmap XLA's big buffers every step
# (per-thread arenas ignore mmap_max): one arena, no trimming, no mmap.
# BENCHMARKS.md section 1.
CPU_MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=34359738368:glibc.malloc.arena_max=1

# Pre-train, fine-tune and evaluate a tiny ResNet on the embedded synthetic hands.
demo: $(STAMP)
	$(CPU_MALLOC) $(PY) -m peclr_jax.main --config configs/demo.py --workdir workdirs/demo

# One style (pyproject.toml [tool.ruff]): a violation fails the tests, and CI.
# `make format` applies it. Simulated CPU devices let the data-parallel tests
# run without accelerators.
test: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(CPU_MALLOC) XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m pytest -n 2 -q tests

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) workdirs
