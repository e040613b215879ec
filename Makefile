# Two entry points for a fresh clone: `make demo` and `make test`. Each builds .venv first.
# torch is installed first and pinned: an unpinned torch pulled in by ray/mlflow would fetch a
# multi-GB CUDA build. pyproject keeps the wide range (torch>=2.4) for users.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test clean

$(BIN)/kd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH)"
	touch $(BIN)/kd

venv: $(BIN)/kd

demo: venv
	$(BIN)/kd run workflows/configs/mnist1d.yaml --out runs/mnist1d

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
