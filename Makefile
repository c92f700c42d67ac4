# jaula: the two commands a new user types are `make demo` and `make test`.
# Both run `make setup` first, which installs everything and is idempotent.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench bench-quick bench-setup clean-build

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(VENV)/bin/pytest -p no:cacheprovider tests

test-unit: setup
	@$(VENV)/bin/pytest -p no:cacheprovider tests/unit

# Live migration side by side with runc and Podman (benchmarks/harness.py); results in
# results/<date>/. bench-quick takes about two minutes. bench-setup installs the baselines
# (Debian's runc, umoci and podman; idempotent); one that still cannot run is reported in
# its rows and does not fail the run (the exit code is jaula's).
bench-setup: setup
	@bash scripts/bench-setup.sh
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[bench]'

bench: bench-setup
	@$(PY) -m benchmarks.harness

bench-quick: bench-setup
	@$(PY) -m benchmarks.harness --quick

# CRIU's zdtm static tests, each migrated node1 -> node2 with every strategy beside plain
# criu dump/restore (benchmarks/zdtm.py, list in benchmarks/zdtm_tests.toml); not part of
# `make test` (about an hour here; a dozen of them are, tests/integration/test_zdtm_sample.py).
# Results in results/zdtm-<date>/; ZDTM_ARGS='--tests a,b --strategies cold' for a subset.
.PHONY: zdtm
zdtm: setup
	@$(PY) -m benchmarks.zdtm $(ZDTM_ARGS)

clean-build:
	rm -rf .build

# Syntax-check the Ansible deployment in ansible/ with ansible-core in a throw-away venv (not
# a project dependency); the `ansible` package brings the ansible.posix collection it uses.
ANSIBLE_VENV ?= /tmp/jaula-ansible-venv
.PHONY: ansible-check
ansible-check:
	@test -x $(ANSIBLE_VENV)/bin/ansible-playbook || { python3 -m venv $(ANSIBLE_VENV) && \
	    $(ANSIBLE_VENV)/bin/pip install -q --disable-pip-version-check ansible-core ansible; }
	@cd ansible && ANSIBLE_HOME=$(ANSIBLE_VENV)/home $(ANSIBLE_VENV)/bin/ansible-playbook \
	    -i inventory.example.ini --syntax-check site.yml
