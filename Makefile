# Every target bootstraps .venv; it reinstalls only when pyproject.toml's content changed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spec-sha256
SPEC_SHA := $(shell sha256sum pyproject.toml | cut -d' ' -f1)
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv simulate test bench clean

venv:
	@if [ ! -x $(PY) ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$(SPEC_SHA)" ]; then \
		echo "[fedcxr] installing dependencies into $(VENV) (pyproject.toml changed or no venv)"; \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install --quiet --upgrade pip && \
		$(PY) -m pip install --quiet -e '.[dev]' && \
		echo "$(SPEC_SHA)" > $(STAMP); \
	fi

simulate: venv
	$(PY) -m simulations.run

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks.run all --json benchmarks/results/latest.json

clean:
	rm -rf $(VENV) outputs .cache
