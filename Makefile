# Two entry points for a fresh Debian/Ubuntu machine:
#   make run   - install everything, then run the whole DVC DAG on the offline mini corpus
#   make test  - install everything, then run the test suite
# Both are idempotent: the install step is skipped when nothing it depends on changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
DEB_STAMP := $(VENV)/.debian-stamp

.PHONY: install run test lint bench clean-outputs

$(DEB_STAMP): debian-packages.txt
	@missing=$$(for p in $$(grep -v '^#' debian-packages.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(DEB_STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU wheel on local disk; an unpinned torch pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(STAMP)

run: install
	@test -d .dvc || $(BIN)/dvc init -q --no-scm 2>/dev/null || true
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	@echo; cat reports/summary.md

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check meld pipeline ray_jobs tests bench

bench: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench.generation
