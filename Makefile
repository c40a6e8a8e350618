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

.PHONY: test venv simulate clean postgres-server net-tools bench-failover lint unit format

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

# The integration tests need PostgreSQL server binaries (found through
# pg_config, as the daemon finds them). As root on Debian they are installed
# here, without the distribution's default cluster: failoverd runs its own.
postgres-server:
	@bindir=$$(pg_config --bindir 2>/dev/null); \
	if [ -n "$$bindir" ] && [ -x "$$bindir/postgres" ] && [ -x "$$bindir/pg_waldump" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "PostgreSQL server binaries not found: integration tests will be skipped (as root: apt-get install postgresql)"; exit 0; fi; \
	echo "installing PostgreSQL server packages"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq postgresql-common >/dev/null && \
	sed -i 's/^#*\s*create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf && \
	apt-get install -y -qq postgresql >/dev/null

# The VIP and its tests use ip (iproute2), arping, ping and sysctl; the
# end-to-end lab (tests/e2e) also nft (nftables) and tc (iproute2), and
# haproxy and pgbouncer (tests/e2e/test_proxies.py starts its own instances;
# the packages' services are disabled, never used); the deploy and daemon
# tests setpriv (util-linux), openssl and systemd-analyze (the systemd
# package; it is not started, only its analyzer is used); gcc and libc6-dev
# build the lab's wall-clock shim (tests/support/e2e/clockshift.c).
net-tools:
	@missing=""; \
	for c in ip:iproute2 arping:iputils-arping ping:iputils-ping sysctl:procps nft:nftables tc:iproute2 \
	         setpriv:util-linux openssl:openssl systemd-analyze:systemd haproxy:haproxy pgbouncer:pgbouncer \
	         gcc:gcc; do \
		command -v $${c%%:*} >/dev/null || [ -x /usr/sbin/$${c%%:*} ] || [ -x /sbin/$${c%%:*} ] || missing="$$missing $${c##*:}"; \
	done; \
	[ -e /usr/include/stdio.h ] || missing="$$missing libc6-dev"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "missing$$missing: VIP and e2e tests will be skipped"; exit 0; fi; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	echo "installing $$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null && \
	{ systemctl disable --now haproxy.service pgbouncer.service >/dev/null 2>&1 || true; }

# tests/unit/test_monitoring.py runs promtool on deploy/prometheus/: Debian's
# prometheus package, without its recommends (node exporter, smartmontools);
# the server it ships is disabled, never used.
.PHONY: promtool
promtool:
	@if command -v promtool >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "promtool missing: the monitoring tests will fail (as root: apt-get install prometheus)"; exit 0; fi; \
	echo "installing prometheus (for promtool)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
	{ systemctl disable --now prometheus.service >/dev/null 2>&1 || true; }

# tests/package/test_deb.py builds the Debian package and installs it in a
# fresh bookworm root: debootstrap makes the root, dpkg-deb (dpkg) builds the
# .deb, strip (binutils) strips its extension modules, python3-venv gives the
# build its environment, unshare and nsenter (util-linux) hold the root's
# tmpfs in a mount namespace of its own.
.PHONY: package-tools
package-tools:
	@missing=""; \
	for c in debootstrap:debootstrap dpkg-deb:dpkg strip:binutils unshare:util-linux nsenter:util-linux; do \
		command -v $${c%%:*} >/dev/null || [ -x /usr/sbin/$${c%%:*} ] || missing="$$missing $${c##*:}"; \
	done; \
	$(PYTHON_SYSTEM) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "missing$$missing: the Debian package test will be skipped or fail"; exit 0; fi; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	echo "installing $$missing"; \
	apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq $$missing >/dev/null

# The Debian package for the DB hosts (packaging/README.md):
# build/deb/failoverd_<version>-1_<arch>.deb, built with the system's python3.
.PHONY: deb
deb:
	$(PYTHON_SYSTEM) packaging/build_deb.py

# pytest exits 5 when it collected no tests; that must fail the build, and it
# does because any non-zero status fails make.
test: $(STAMP) postgres-server net-tools promtool package-tools
	$(PY) -m pytest

# Lint and type checks: ruff (rules and format) everywhere, mypy with strict
# checks on the protocol core and the port protocols (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check failoverd tests bench
	$(VENV)/bin/ruff format --check failoverd tests bench
	$(VENV)/bin/mypy

# Rewrite the code the way `make lint` wants it.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix failoverd tests bench
	$(VENV)/bin/ruff format failoverd tests bench

# The inner loop: the unit tests only (no PostgreSQL, no namespaces), under a minute.
unit: $(STAMP) promtool
	$(PY) -m pytest tests/unit -q

.PHONY: bench demo

# The fault matrix of the namespace lab (tests/e2e), 5 rounds, the stability
# profile and the idle cost of a supervisor; as root (needs ip netns). Without
# namespaces it falls back to the loopback benchmark. About 12 minutes.
bench: $(STAMP) postgres-server net-tools bench-switchover
	$(PY) bench/failover.py --mode auto --runs 5 --json bench/results/e2e.json

# Failover time on loopback only (no namespaces, no VIP): postmaster SIGKILL.
bench-failover: $(STAMP) postgres-server
	$(PY) bench/failover.py --mode loopback --runs 5 --json bench/results/failover.json

# Planned switchover on loopback (issue #5): the write pause a light writer sees
# during `failoverctl switchover`, and where the time goes. About 2 minutes.
.PHONY: bench-switchover
bench-switchover: $(STAMP) postgres-server
	$(PY) bench/switchover.py --runs 6 --json bench/results/switchover.json

# The write gap of one failover seen through the VIP, HAProxy, PgBouncer->VIP
# and PgBouncer->HAProxy at once (deploy/haproxy.cfg, deploy/pgbouncer.ini),
# in the namespace lab; as root. About 5 minutes.
.PHONY: bench-proxies
bench-proxies: $(STAMP) postgres-server net-tools
	$(PY) bench/proxies.py --runs 5 --json bench/results/proxies.json

# The write gap of `failoverctl restart --rolling --pending-only` after a
# reload (loopback, a light writer), 3 runs. About 3 minutes.
.PHONY: bench-rolling-restart
bench-rolling-restart: $(STAMP) postgres-server
	$(PY) bench/rolling_restart.py --runs 3 --json bench/results/rolling_restart.json

# Every host saturated (pgbench through the VIP, CPU burners, an fsync-ing
# disk writer) for 3 minutes: elections and failovers must stay at 0.
.PHONY: bench-saturation
bench-saturation: $(STAMP) postgres-server net-tools
	$(PY) bench/saturation.py --seconds 180 --json bench/results/saturation.json

# Idle RSS and CPU of each member (supervisor and watchdog) in the namespace
# lab over 60 s against the goals, then the heartbeat trade-off on loopback
# (0.1 s and 0.2 s, 30 s each). About 4 minutes.
.PHONY: bench-idle
bench-idle: $(STAMP) postgres-server net-tools
	$(PY) bench/idle.py --lab --seconds 60 --json bench/results/idle-lab.json
	$(PY) bench/idle.py --seconds 30 --json bench/results/idle.json

# A three-node cluster with a VIP in network namespaces, one failover with its
# timeline, then everything removed (loopback and a multi-host DSN without root).
demo: $(STAMP) postgres-server net-tools
	$(PY) bench/demo.py

simulate: $(STAMP)
	$(VENV)/bin/failoverd simulate --seeds 1000

# Before any protocol change is called done: 100,000 seeds of every cluster
# shape, sharded over the cores, one summary line per shape (hours).
.PHONY: simulate-long
simulate-long: $(STAMP)
	$(VENV)/bin/failoverd simulate --shape all --seeds 100000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
