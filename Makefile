# failoverd developer entry points. Every target installs what it needs.
#
# The virtualenv is built from the system interpreter (/usr/bin/python3), not
# from a python under /root, so that processes running as the unprivileged
# `postgres` user can execute it.

SHELL := /bin/bash
PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test venv simulate clean

$(STAMP): pyproject.toml
	@if [ ! -x "$(PYTHON_SYSTEM)" ]; then echo "need $(PYTHON_SYSTEM) (Debian: apt-get install python3)"; exit 1; fi
	@if ! $(PYTHON_SYSTEM) -c 'import venv, ensurepip' 2>/dev/null; then \
		echo "installing python3-venv"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	fi
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# pytest exits 5 when it collected no tests; that must fail the build, and it
# does because any non-zero status fails make.
test: $(STAMP)
	$(PY) -m pytest

simulate: $(STAMP)
	$(VENV)/bin/failoverd simulate --seeds 1000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
