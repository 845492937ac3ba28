# xdpwatch — everything a fresh machine needs is installed by `make setup` (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
DURATION ?= 60
DEMO_DIR ?= demo-output
BENCH_OUT ?= bench/results

.PHONY: setup lock install-systemd test test-soak test-unit test-kernel test-e2e demo bench clean help

help:
	@echo "make demo       setup, then the whole pipeline for DURATION s (default 60) with a live view"
	@echo "make bench      setup, then every benchmark side by side, median of BENCH_RUNS runs (default 3; BENCH_QUICK=1: one smoke run)"
	@echo "make setup      install Debian packages, kernel header links, .venv, test broker (idempotent)"
	@echo "make install-systemd  (root) the producer as a systemd service: venv in /opt/xdpwatch, user, unit, /etc/xdpwatch"
	@echo "make lock       regenerate requirements.lock and requirements-image.lock (UPGRADE=1: newest versions)"
	@echo "make test       setup, then every test (unit, kernel, end to end)"
	@echo "make test-unit  pure-Python tests only (fast, no root)"
	@echo "make test-soak  long crash and outage variants (20 rounds of broker outages, 100 kill -9, ...)"

setup:
	@bash scripts/setup.sh

# The Python packages, pinned with their sha256, that setup and the image install (a few minutes).
lock:
	@bash scripts/lock.sh

# The producer as a systemd service (README "Bare metal (systemd)"); idempotent, run again to upgrade.
# DESTDIR=/some/root installs under another root (tests); PREFIX= moves the venv.
install-systemd:
	@bash scripts/install-systemd.sh

test: setup
	$(PYTEST) -q -ra --durations=25 tests

# The long variants of the crash and outage tests: each broker outage test 20 times (the
# broker gone mid-request), 100 producer and 40 archiver kill -9, a 4-minute stream of attacks
# with the alert consumer killed (about 40 minutes).
test-soak: setup
	XDPWATCH_SOAK=1 $(PYTEST) -q -ra tests/e2e/test_outage.py tests/e2e/test_attach.py tests/e2e/test_archive.py tests/e2e/test_exactly_once.py

test-unit: setup
	$(PYTEST) -q tests/unit

test-kernel: setup
	$(PYTEST) -q tests/kernel

demo: setup
	$(VENV)/bin/xdpwatch demo --duration $(DURATION) --dir $(DEMO_DIR)

bench: setup
	$(PY) bench/run.py --out $(BENCH_OUT) $(if $(BENCH_QUICK),--quick,) $(if $(BENCH_RUNS),--runs $(BENCH_RUNS),)

test-e2e: setup
	$(PYTEST) -q tests/e2e

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info producer/_fastpath*.so
