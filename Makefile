# The two commands a newcomer needs: `make demo` and `make test`. Both set themselves up.
#
#   make test                 create .venv (python3), install, run the default suite
#   make test PY=python3.13   the same on another interpreter (own venv: .venv-python3.13)
#   make lint                 ruff + mypy --strict (its settings: pyproject.toml)
#   make demo                 the main job, shown: a legacy robot client through injected faults
#   make stress               make test + make demo with a busy loop holding one core
#   make soak                 the long tests (marker `slow`)
#   make field                the real-client matrix against real servers -> docs/field.md
#   make bench                benchmarks against the plain gevent socket -> benchmarks/RESULTS.md
#   make conformance          CPython's socket test files under patch() -> docs/conformance.md
#   make conformance-quick    the CI subset of it (the client-protocol files)
#   make peer-suites          redis-py, PyMySQL and urllib3's own suites, gevent vs resilientsock
#                             (root: installs redis-server/mariadb; not part of .ci/run)
#   make docs                 the API reference from the docstrings -> docs/api/ (pdoc, offline)

PY ?= python3
# pyenv installs 3.10-3.13 but its shims only expose the global one: fall back to the versions dir.
PYTHON := $(shell $(PY) -c 'import sys; print(sys.executable)' 2>/dev/null || \
            ls -d $$HOME/.pyenv/versions/$(patsubst python%,%,$(PY))*/bin/python3 2>/dev/null | tail -n 1)
VENV ?= $(if $(filter python3,$(PY)),.venv,.venv-$(notdir $(PY)))
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test fuzz field field-deps lint demo stress soak bench conformance conformance-quick system-deps clean docs peer-suites

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "cannot find an interpreter for PY=$(PY)"; exit 2; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,lint,docs]'
	touch $(STAMP)

# Servers the tests talk to, as apt-package:executable pairs. Best effort and idempotent:
# only what is missing is installed, in one apt-get call, as root; otherwise the tests that
# need a server skip with a reason. (On a machine whose init system runs, apt starts these
# as system services too; the tests never use those: they start their own on free loopback
# ports.) `make test` installs what its tests use (TEST_DEPS: redis-server for the redis-py
# tests, memcached for the memcached dialect, sshd for SSH through the session relay);
# `make field` installs the rest of the real-client matrix's servers too (FIELD_DEPS).
TEST_DEPS := redis-server:redis-server memcached:memcached openssh-server:sshd
FIELD_DEPS := $(TEST_DEPS) nginx:nginx mariadb-server:mariadbd exim4:exim4
DEPS ?= $(TEST_DEPS)

# The real-client matrix's own servers (make field only): dovecot for imaplib, slapd for
# ldap3, RabbitMQ (its STOMP plugin) for stomp.py; debconf noninteractive; the tests run
# their own instances from temp folders, never the system services.
FIELD_EXTRA_DEPS := dovecot-imapd:dovecot slapd:slapd ldap-utils:ldapadd \
              rabbitmq-server:/usr/lib/rabbitmq/bin/rabbitmq-server
field-deps:
	@missing=""; for pair in $(FIELD_EXTRA_DEPS); do exe=$${pair##*:}; \
	  command -v $$exe >/dev/null 2>&1 || test -x /usr/sbin/$$exe || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
	       apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the field rows that need them will skip"; \
	  else echo "note: missing$$missing (not root, or no apt-get); the field rows that need them will skip"; fi; \
	fi

system-deps:
	@missing=""; for pair in $(DEPS); do exe=$${pair##*:}; \
	  command -v $$exe >/dev/null 2>&1 || test -x /usr/sbin/$$exe || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the tests that need them will skip"; \
	  else echo "note: missing$$missing (not root, or no apt-get); the tests that need them will skip"; fi; \
	fi

test: $(STAMP) system-deps
	$(VPY) -m pytest $(PYTEST_ARGS) -m "not slow and not field"

# The real-client matrix (tests/field, marker `field`; docs/design.md §9): each real client, plain
# and under resilientsock, against its real server -> build/field/*.json, then the table in
# docs/field.md. FIELD_RS_COMMIT=<rev> pins the clients' resilientsock to a commit.
FIELD_STAMP := $(VENV)/.installed-field
$(FIELD_STAMP): $(STAMP)
	$(VPY) -m pip install -q -e '.[test,lint,field]'
	touch $(FIELD_STAMP)

field: $(FIELD_STAMP) field-deps
	@$(MAKE) --no-print-directory system-deps DEPS="$(FIELD_DEPS)"
	$(VPY) -m pytest $(PYTEST_ARGS) -m field -p no:randomly tests/field; status=$$?; \
	  $(VPY) tests/field/report.py --write docs/field.md; exit $$status

# The relay fuzz test with many more examples than `make test` runs (a few minutes).
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	RESILIENTSOCK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest $(PYTEST_ARGS) -p no:randomly tests/test_relay_fuzz.py

soak: $(STAMP) system-deps
	$(VPY) -m pytest $(PYTEST_ARGS) -m slow

bench: $(STAMP)
	$(VPY) benchmarks/bench.py --write benchmarks/RESULTS.md $(BENCH_ARGS)
	$(VPY) benchmarks/bench_proxy.py --append benchmarks/RESULTS.md
	$(VPY) benchmarks/bench_session.py --append benchmarks/RESULTS.md
	$(VPY) benchmarks/bench_modes.py --append benchmarks/RESULTS.md

conformance: $(STAMP)
	$(VPY) conformance/run.py --write docs/conformance/ $(CONFORMANCE_ARGS)

conformance-quick: $(STAMP)
	$(VPY) conformance/run.py --quick $(CONFORMANCE_ARGS)

# Servers on loopback for peer/run.py (redis-server with TLS, MariaDB); each suite gets a venv of
# its own under peer/.work/. About 20 minutes on 2 CPUs; PEER_ARGS="--suites redis" for one.
peer-suites: $(STAMP)
	@for exe in redis-server mariadbd; do command -v $$exe >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      redis-server mariadb-server >/dev/null; \
	  else echo "peer-suites needs redis-server and mariadb-server"; exit 2; fi; }; done
	$(VPY) peer/run.py --write docs/conformance/peer-suites.md $(PEER_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check resilientsock tests examples benchmarks conformance peer
	$(VPY) -m mypy

demo: $(STAMP)
	$(VPY) -m resilientsock demo $(DEMO_ARGS)

# Flakiness made visible: `make test` and `make demo` while a busy loop holds one core (the
# loaded CI box). The hog is killed however the runs end; the status is non-zero if either
# failed. STRESS_RUNS=5 repeats both.
STRESS_RUNS ?= 1
stress: $(STAMP) system-deps
	@python3 -c 'while True: pass' & hog=$$!; trap 'kill $$hog 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	status=0; for i in $$(seq 1 $(STRESS_RUNS)); do \
	  echo "::: stress run $$i/$(STRESS_RUNS): make test + make demo, one core busy (pid $$hog)"; \
	  $(MAKE) --no-print-directory test || { echo "::: stress run $$i: make test FAILED"; status=1; }; \
	  $(MAKE) --no-print-directory demo || { echo "::: stress run $$i: make demo FAILED"; status=1; }; \
	done; \
	echo "::: stress: $$( [ $$status = 0 ] && echo green || echo FAILED )"; exit $$status

# pdoc renders self-contained HTML (no CDN, no network); its assets are in the wheel.
docs: $(STAMP)
	rm -rf docs/api
	$(VPY) -m pdoc --output-directory docs/api resilientsock resilientsock.testing
	@echo "API reference: docs/api/index.html"

clean:
	rm -rf .venv .venv-* *.egg-info build dist
