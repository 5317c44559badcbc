# Two commands: `make studio` starts the web studio, `make test` runs the tests.
# Each creates .venv and installs the project into it the first time (torch pinned to 2.13.0 so that a
# CPU-only machine gets the CPU wheel).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: studio test install

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

studio: $(STAMP)
	$(VENV)/bin/studio serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
