# activecall — the two commands a newcomer needs:
#   make run    set everything up and run the daemon on etc/activecall.toml
#   make test   set everything up and run the whole test suite
# Both are idempotent: they create .venv, pip install the project and apt-get
# the Debian packages that are missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONF ?= etc/activecall.toml

.PHONY: setup deps run test bench clean

setup: deps $(VENV)/.stamp-install

# the editable install also compiles the C extension (src/activecall/media/_rtpcore.c) in place,
# so it runs after deps (which provides the compiler)
$(VENV)/.stamp-install: setup.cfg setup.py pyproject.toml requirements-test.txt src/activecall/media/_rtpcore.c | deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e . -r requirements-test.txt
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

deps:
	PYTHON=$(PYTHON) tools/install-debian-deps

run: setup
	$(BIN)/twistd --nodaemon --pidfile= --reactor=asyncio activecall --conf $(CONF)

test: setup
	$(BIN)/python tools/run-tests $(TESTS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; \
	  args=""; [ "$$b" = bench/bench_soak.py ] && args="--duration 120 --interval 20"; \
	  $(BIN)/python $$b $$args || exit 1; done

clean:
	rm -rf $(VENV) _trial_temp* build src/*.egg-info src/activecall/media/_rtpcore*.so
