# Two commands do all set-up on a fresh machine:
#   make demo   the main job: end-to-end speech LLM on CPU, output in runs/demo/
#   make test   the test suite (CI runs exactly this)
# Both create .venv if absent and install what they need; re-running is cheap.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_CONFIG ?= configs/demo.py
PYTEST_ARGS ?= -n 2  # two workers: most tests wait on single-threaded XLA compiles

# One stamp per set of extras: the demo installs the base package only (no
# PyTorch), the tests add the parity references, the benchmarks theirs.
$(VENV)/.installed-%: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.$(if $(filter base,$*),,[$*])'
	touch $@

.PHONY: install test demo demo-quick bench clean

install: $(VENV)/.installed-test

test: $(VENV)/.installed-test chromium
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# Debian's headless Chromium for the web-page test (best effort: the test
# skips, saying why, where it cannot be installed).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed; the web-page test will be skipped"

demo: $(VENV)/.installed-base
	$(PY) -m speechjax.projects.spoken_commands --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)

demo-quick: $(VENV)/.installed-base
	$(PY) -m speechjax.projects.spoken_commands --config=$(DEMO_CONFIG):quick --workdir=runs/demo_quick

bench: $(VENV)/.installed-bench
	$(PY) -m bench.run_all

clean:
	rm -rf runs/demo runs/demo_quick

# The tests not marked slow (tests/conftest.py, SLOW_TESTS): a few minutes on 2 cores.
.PHONY: test-fast lint
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest tests -q -n 2 -m "not slow"

# ruff with the settings in ruff.toml; `$(PY) -m ruff check --fix ...` repairs most findings.
lint: $(VENV)/.installed-test
	$(PY) -m ruff check --no-cache speechjax tests bench configs
