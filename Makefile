# Every target sets itself up from nothing: it creates .venv and installs the package first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# The whole suite (slow tests included). Exit code 5 (no test collected) is a failure here.
test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m retrieval_jax.cli demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/pooling.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
