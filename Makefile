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

test: $(VENV)/.installed-test chromium voices
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# Debian's headless Chromium for the web-page test (best effort: the test
# skips, saying why, where it cannot be installed).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed; the web-page test will be skipped"

# Debian's flite and festival voices, for the unseen-synthesizer tests and
# `make demo-other-voices` (best effort: those skip, saying why, without them).
.PHONY: voices
voices:
	@command -v flite >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq flite festival \
	  festvox-kdlpc16k festvox-us-slt-hts >/dev/null) || echo "flite/festival could not be installed"

demo: $(VENV)/.installed-demo
	$(PY) -m speechjax.projects.spoken_commands --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)

demo-quick: $(VENV)/.installed-demo
	$(PY) -m speechjax.projects.spoken_commands --config=$(DEMO_CONFIG):quick --workdir=runs/demo_quick

# After `make demo`: the same test sentences spoken by synthesizers the demo
# never trains on (Debian's flite and festival, installed here when missing;
# skipped with a message where they cannot be), scored with the demo's model.
.PHONY: demo-other-voices demo-baseline demo-cascade
demo-other-voices: $(VENV)/.installed-demo voices
	$(PY) -m speechjax.projects.spoken_commands.other_voices --workdir=$(DEMO_DIR)

# The intent cascade: the speech LLM's transcripts -> a BERT trained on the training transcripts.
demo-cascade: $(VENV)/.installed-demo
	$(PY) -m speechjax.projects.spoken_commands.cascade --workdir=$(DEMO_DIR)

# Whisper tiny.en alone (PyTorch transformers, greedy) on the same sets: the baseline row.
demo-baseline: $(VENV)/.installed-test
	$(PY) -m speechjax.projects.spoken_commands.whisper_baseline --workdir=$(DEMO_DIR)

bench: $(VENV)/.installed-bench
	$(PY) -m bench.run_all

# docs/recipe_memory.md: every recipe compiled for its TPU slice (and one smaller and larger) on
# this CPU with libtpu, then for one host of 8 A100s and of 8 H100s with JAX's CUDA plugin (its own
# environment, so the tests' JAX stays CPU-only): per-chip memory, fit, max batch, FLOPs (an hour on 2 cores).
GPU_COMPILE_VENV := .venv-gpu-compile
$(GPU_COMPILE_VENV)/.installed: setup.py
	test -x $(GPU_COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(GPU_COMPILE_VENV)
	$(GPU_COMPILE_VENV)/bin/python -m pip install -q -e '.[gpu-compile]'
	touch $@

.PHONY: recipe-table
recipe-table: $(VENV)/.installed-test $(GPU_COMPILE_VENV)/.installed
	$(PY) -m speechjax.compilation.recipe_table --out=docs/recipe_memory.md
	$(GPU_COMPILE_VENV)/bin/python -m speechjax.compilation.recipe_table --update --out=docs/recipe_memory.md

clean:
	rm -rf runs/demo runs/demo_quick

# The tests not marked slow (tests/conftest.py, SLOW_TESTS): a few minutes on 2 cores.
.PHONY: test-fast lint
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest tests -q -n 2 -m "not slow"

# ruff with the settings in ruff.toml; `$(PY) -m ruff check --fix ...` repairs most findings.
lint: $(VENV)/.installed-test
	$(PY) -m ruff check --no-cache speechjax tests bench configs
