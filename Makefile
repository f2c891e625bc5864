# Set-up is idempotent: every target creates .venv on first use and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow system-deps lint demo bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so that transformers does not pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# System programs some tests need (Chromium for the report's and the serve page's browser tests; Playwright drives
# the system one, never a downloaded browser): installed when missing, as root; otherwise named. Under CI=true a test
# whose program is missing fails instead of skipping.
system-deps:
	@.ci/system-deps

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q --durations=15

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/emojax run --config configs/demo.yaml

bench: $(STAMP)
	$(PY) scripts/bench.py --device cpu

clean-venv:
	rm -rf $(VENV)
