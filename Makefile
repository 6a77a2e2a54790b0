# Two commands do all set-up on a fresh machine:
#   make demo   the main job: end-to-end speech LLM on CPU, output in runs/demo/
#   make test   the test suite (CI runs exactly this)
# Both create .venv if absent and install what they need; re-running is cheap.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_CONFIG ?= configs/demo.py
PYTEST_ARGS ?= -n 2  # two workers: most tests wait on single-threaded XLA compiles

.PHONY: install test demo demo-quick bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m speechjax.demo --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)

demo-quick: $(STAMP)
	$(PY) -m speechjax.demo --config=$(DEMO_CONFIG):quick --workdir=runs/demo_quick

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf runs/demo runs/demo_quick
