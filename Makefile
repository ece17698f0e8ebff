# make demo | make test | make local | make bench | make storm | make chaos — each sets itself up first.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip install --disable-pip-version-check --progress-bar off
API_PORT ?= 8000
export API_PORT

# One virtualenv, two tiers, each installed once (and again when one of its requirements files changes), each
# with its stamp: the local tier (requirements-local.txt: the service, the device client, chalice) is what
# make demo, local, package and deploy run; the dev tier (requirements-dev.txt) adds the tools on top of it for
# make test and the benchmarks. So `make test` after `make demo` installs the tools only, and `make demo` after
# `make test` installs nothing.
LOCAL_TIER := $(VENV)/.installed-local
DEV_TIER   := $(VENV)/.installed-dev

.PHONY: install install-local demo test local bench bench-quick report-screenshot storm chaos package deploy clean

install: $(DEV_TIER)
install-local: $(LOCAL_TIER)

$(VENV)/pyvenv.cfg:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed (found: $$($(PYTHON) --version 2>&1))."; exit 1; }
	@echo "make: creating the virtualenv $(VENV) with $$($(PYTHON) --version 2>&1)"
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  echo "python venv is missing. Install it with: apt-get install -y python3-venv"; exit 1; }

$(LOCAL_TIER): requirements-local.txt requirements.txt device/requirements.txt | $(VENV)/pyvenv.cfg
	@echo "make: installing the service, device and local-stage packages into $(VENV) (once; about 20 s)"
	$(PIP) -r requirements-local.txt
	@touch $@

$(DEV_TIER): $(LOCAL_TIER) requirements-dev.txt
	@echo "make: adding the development tools (tests, lint, types, benchmarks) to $(VENV) (once; about a minute)"
	$(PIP) -r requirements-dev.txt
	@touch $@

# The whole story on the local stage, in a directory of its own (git ignores ./demo), replaced at every run.
DEMO_DIR ?= demo
demo: install-local
	$(PY) -m devstack.demo --dir "$(DEMO_DIR)"

local: install-local
	$(PY) -m devstack.local --api-port $(API_PORT)

# Lint, types and the layers' import contracts first; then the suite. pytest's exit code 5 (no tests collected)
# fails like any other.
test: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

bench: install
	$(PY) -m bench.run --size full

bench-quick: install
	$(PY) -m bench.run --size quick

# The README's picture of the fleet report: a synthetic 20,000-device fleet, headless Chromium.
report-screenshot: install
	$(PY) -m bench.report --devices 20000 --screenshot docs/report.png

storm: install
	$(PY) -m bench.storm --size default

# kill -9 of make local during bursts of provisioning, then every device retries: no orphan, no double, audit clean.
chaos: install
	$(PY) -m bench.chaos --size default

# The prod stage's Lambda package with bytecode, trimmed (devstack/lambda_package.py); deploy uploads it.
package: install-local
	$(PY) -m devstack.lambda_package build/lambda

deploy: install-local
	$(PY) -m devstack.lambda_package --deploy build/lambda

# The demo's directory only when the demo made it (devstack/demo.py leaves that marker in it).
clean:
	rm -rf $(VENV) .state .pytest_cache build
	@if [ -f "$(DEMO_DIR)/.made-by-make-demo" ]; then rm -rf "$(DEMO_DIR)"; echo "rm -rf $(DEMO_DIR)"; fi
