# The two set-up commands of README.md: `make demo` and `make test`. Each creates and fills
# the local virtual environment .venv on first use (idempotent, silent once installed).
# `make test` also installs the reference frameworks the porting oracles compare against
# (keras, torch, torchvision: ~5.5 GB, ~2 minutes); `make test ORACLES=0` skips them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip install -q --disable-pip-version-check -c requirements-lock.txt
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2 -q --durations=15
ORACLES ?= 1

.PHONY: demo test venv clean-venv

demo: $(VENV)/.installed
	@mkdir -p $(dir $(abspath $(WORKDIR)))
	@$(PY) -m experiments.demo --workdir=$(WORKDIR)

ifeq ($(ORACLES),1)
test: $(VENV)/.installed $(VENV)/.installed-oracle
else
test: $(VENV)/.installed
endif
	@MEDXAI_REQUIRE_ORACLES=$(ORACLES) $(PY) -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	@echo "Creating $(VENV) (first run only, about a minute)..."
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) -e ".[test]"
	@touch $@

$(VENV)/.installed-oracle: $(VENV)/.installed
	@echo "Installing the oracle frameworks into $(VENV) (first run only, a few minutes)..."
	@$(PIP) -e ".[test,oracle]"
	@touch $@

clean-venv:
	rm -rf $(VENV)
