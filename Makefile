# Every target sets itself up from nothing: it creates .venv and installs the package first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extras installed for the test suite. CI adds `torch` and `tfds` (tensorflow + Keras) for the
# torchvision and Keras parity tests, which skip without them:
#   make test TEST_EXTRAS=test,pretrained,torch,tfds
TEST_EXTRAS ?= test,pretrained
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(TEST_EXTRAS))

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $@

install: $(STAMP)

# The whole suite (slow tests included), on TEST_WORKERS pytest-xdist processes: much of it is
# single-threaded XLA compilation, so two workers use both cores of a 2-core machine (about 6
# vs 11.6 minutes there). Each test file stays in one worker (its module fixtures are built once).
# Exit code 5 (no test collected) is a failure here.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The end-to-end demo (retrieval_jax/demo.py, configs/demo.py): ImageNet vs fine-tuned test mAP
# on the synthetic benchmark, a ScaNN search, report.json and figures in runs/demo (about ten
# minutes on 2 CPU cores; an interrupted run resumes its training).
demo: $(STAMP)
	$(PY) -m retrieval_jax.cli demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
