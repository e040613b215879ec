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

# The report page's browser test (tests/workflows/test_report_page.py) renders in headless Chromium:
# `make test` installs it with apt-get where it is missing (as root, else via passwordless sudo). If it
# cannot, it says so and the tests run anyway: that test then fails under CI=… and skips elsewhere.
HAVE_CHROMIUM = command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	|| command -v google-chrome >/dev/null 2>&1
APT = env DEBIAN_FRONTEND=noninteractive apt-get -q -o Dpkg::Use-Pty=0
INSTALL_CHROMIUM = if [ "$$(id -u)" = 0 ]; then as=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as="sudo -n"; \
	else as=none; fi; \
	if [ "$$as" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make test: Chromium is missing and cannot be installed here (needs apt-get, and root or passwordless" \
	       "sudo): install chromium yourself; the report page's browser test will report it" >&2; \
	else \
	  echo "make test: installing Chromium (apt-get install -y chromium)"; \
	  if $$as $(APT) update </dev/null && $$as $(APT) install -y chromium </dev/null; then chromium --version; \
	  else echo "make test: installing Chromium failed; the report page's browser test will report it" >&2; fi; \
	fi

test: venv
	@if ! { $(HAVE_CHROMIUM); }; then $(INSTALL_CHROMIUM); fi
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
