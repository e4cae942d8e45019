# The two set-up commands of README.md: `make demo` and `make test`. Each creates and fills
# the local virtual environment .venv on first use (idempotent, silent once installed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test venv clean-venv

demo: $(VENV)/.installed
	@mkdir -p $(dir $(abspath $(WORKDIR)))
	@$(PY) -m experiments.demo --workdir=$(WORKDIR)

test: $(VENV)/.installed
	@$(PY) -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	@echo "Creating $(VENV) (first run only, about a minute)..."
	@$(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -c requirements-lock.txt -e ".[test]"
	@touch $@

clean-venv:
	rm -rf $(VENV)
