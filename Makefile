# jaula: the two commands a new user types are `make demo` and `make test`.
# Both run `make setup` first, which installs everything and is idempotent.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench bench-quick clean-build

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(VENV)/bin/pytest -p no:cacheprovider tests

test-unit: setup
	@$(VENV)/bin/pytest -p no:cacheprovider tests/unit

clean-build:
	rm -rf .build
