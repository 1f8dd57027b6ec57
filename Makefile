# regionshift: `make demo` runs the local world, `make test` runs every check and test.
# Both set themselves up: a virtual environment in .venv and the Debian packages they use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_SECONDS ?= 150
# Debian packages: what the tests and the demo need, and what the benchmarks compare against.
TEST_DEBS := prometheus prometheus-alertmanager postgresql mosquitto chromium
DEMO_DEBS := mosquitto
BENCH_DEBS := prometheus-blackbox-exporter postgresql mosquitto chromium

.PHONY: demo test check lint typecheck layers bench install debs-test debs-demo debs-bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Installs the named Debian packages that are missing (as root, or with sudo when there is one).
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

debs-test:
	$(call apt_install,$(TEST_DEBS))

debs-demo:
	$(call apt_install,$(DEMO_DEBS))

debs-bench:
	$(call apt_install,$(BENCH_DEBS))

demo: install debs-demo
	$(BIN)/regionshift demo --duration $(DEMO_SECONDS)

lint: install
	$(BIN)/ruff check controller probes tests bench
	$(BIN)/ruff format --check controller probes tests bench

typecheck: install
	$(BIN)/mypy

layers: install
	$(BIN)/lint-imports --no-cache

check: lint typecheck layers

test: check debs-test
	$(BIN)/pytest

bench: install debs-bench
	$(BIN)/python bench/probe_throughput.py
	$(BIN)/python bench/actuation.py
	$(BIN)/python bench/restart.py
	$(BIN)/python bench/replication_lag.py
	$(BIN)/python bench/detection.py
	$(BIN)/python bench/false_alarms.py
	$(BIN)/python bench/judge_scale.py
	$(BIN)/python bench/mqtt_ingest.py
	$(BIN)/python bench/agent_publish.py
	$(BIN)/python bench/event_stream.py
	$(BIN)/python bench/page_load.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
