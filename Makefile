# jaula: the two commands a new user types are `make demo` and `make test`.
# Both run `make setup` first, which installs everything and is idempotent.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup setup-venv demo lint test test-unit bench bench-quick bench-setup clean-build

setup:
	@bash scripts/setup.sh

# Only the venv (no apt, no CRIU, no root), for `make lint` and `make test-unit`: made when
# missing, pip-installed again when pyproject.toml changed (the stamp scripts/setup.sh keeps,
# under its lock). Without root and pycriu, the tests that need them skip and say why.
setup-venv:
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	    { echo "setup-venv: ERROR: jaula needs python3 >= 3.11 on PATH" >&2; exit 1; }
	@mkdir -p .build && flock -w 900 .build/.setup.lock sh -ec ' \
	    if ! $(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then \
	        echo "setup-venv: creating $(VENV)"; rm -rf $(VENV); python3 -m venv $(VENV); fi; \
	    h=$$(sha256sum pyproject.toml | cut -d" " -f1); \
	    if [ "$$(cat $(VENV)/.jaula-pyproject.sha256 2>/dev/null)" != "$$h" ]; then \
	        echo "setup-venv: pip install -e .[test]"; \
	        $(PY) -m pip install -q --disable-pip-version-check -e ".[test]"; \
	        echo "$$h" >$(VENV)/.jaula-pyproject.sha256; fi'

# ruff (lint and format) and mypy at the versions pinned in pyproject.toml's test extra;
# `make test` runs it before the tests. Fix formatting with `.venv/bin/ruff format .`.
lint: setup-venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

demo: setup
	@bash scripts/demo.sh

# A loaded node relieved by the balancing daemon (three local nodes; scripts/demo-balance.sh).
.PHONY: demo-balance
demo-balance: setup
	@bash scripts/demo-balance.sh

# Two pytest shards side by side (scripts/test.sh; JAULA_TEST_SHARDS=1 for one serial run).
test: setup
	@$(MAKE) --no-print-directory lint
	@bash scripts/test.sh

# The whole migration suite (tests/integration) with every cluster made by make_cluster on a
# real 3-member etcd (JAULA_TEST_STATE=etcd); `make test` runs only the tests marked
# @both_backends on etcd (a cold and a post-copy round trip, a rollback).
.PHONY: test-etcd
test-etcd: setup
	@JAULA_TEST_STATE=etcd $(VENV)/bin/pytest -p no:cacheprovider tests/integration

# No root needed (tests/unit uses fakes and tmp_path).
test-unit: setup-venv
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

# The balancer's policy against a simulated cluster of 100 and 1,000 nodes beside no balancing
# and Proxmox's rule (benchmarks/balancer_sim.py); no root, no cluster. Results in
# results/balancer-<date>/ (summary.md, runs.json, imbalance.png); about ten minutes.
.PHONY: bench-balancer
bench-balancer: setup-venv
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[bench]'
	@$(PY) -m benchmarks.balancer_sim $(BALANCER_SIM_ARGS)

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

# A fault campaign (tests/chaos/campaign.py, issue 15): SIGKILL of the source's and the
# destination's node service, the control link cut, the CLI killed, each at a phase of a
# migration (transfer, frozen, held at pre-resume, random), both strategies; after each the
# container must run on exactly one node with its counter intact and nothing left. Prints
# the ledger (faults, lost, doubled, stuck, broken, leaks per phase, fault and strategy).
# CHAOS_ARGS='--faults 20 --strategies cold --out results/chaos.json'. `make test` runs a
# sample (tests/chaos/test_chaos_sample.py, JAULA_CHAOS_SAMPLE faults, default 8).
.PHONY: chaos
chaos: setup
	@$(PY) -m tests.chaos.campaign $(CHAOS_ARGS)
