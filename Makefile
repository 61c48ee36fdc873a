# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package with what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Pre-train, fine-tune and evaluate a tiny ResNet on the embedded synthetic hands.
demo: $(STAMP)
	$(PY) -m peclr_jax.main --config configs/demo.py --workdir workdirs/demo

# Simulated CPU devices let the data-parallel tests run without accelerators.
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) workdirs
