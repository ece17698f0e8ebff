# make demo | make test | make local | make bench | make storm | make chaos — each sets itself up first.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
API_PORT ?= 8000
export API_PORT

.PHONY: install demo test local bench bench-quick report-screenshot storm chaos package deploy clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt device/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed (found: $$($(PYTHON) --version 2>&1))."; exit 1; }
	@echo "make install: creating the virtualenv $(VENV) with $$($(PYTHON) --version 2>&1) (once, and again when a requirements file changes)"
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  echo "python venv is missing. Install it with: apt-get install -y python3-venv"; exit 1; }
	@echo "make install: installing the service, device and test packages from PyPI into $(VENV) (about a minute)"
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements-dev.txt
	@touch $@
	@echo "make install: done; $(VENV)/bin has python and chalice"

demo: install
	$(PY) -m devstack.demo

local: install
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
package: install
	$(PY) -m devstack.lambda_package build/lambda

deploy: install
	$(PY) -m devstack.lambda_package --deploy build/lambda

clean:
	rm -rf $(VENV) .state .pytest_cache build
