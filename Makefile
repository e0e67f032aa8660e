# The mesh's commands. Every target installs what it needs first; nothing is done by hand.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(shell find protos -name '*.proto')
PROTO_OUT := src

.PHONY: up test proto lint breaking bench eval load k8s-check install clean fmt

$(VENV)/bin/python:
	$(PY_SYS) -m venv $(VENV)

# Pinned Python dependencies (the runtime lock and, on top, the development one) plus the project in editable
# mode; redone when a lock changes.
.stamp-install: requirements.lock requirements-dev.lock pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# buf (proto lint) comes from npm, pinned in package.json / package-lock.json.
.stamp-npm: package.json package-lock.json
	# `npm install` honours the lock; `npm ci` trips over buf's per-platform optional packages that this registry lacks.
	# --no-save keeps the lock as committed (without it, npm rewrites it with those packages on every fresh run).
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

# Headless Chromium for the web page's browser tests, from Debian's packages (Playwright drives it).
.stamp-chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: install Debian's chromium package (sudo apt-get install chromium)"; exit 1; fi; \
	fi
	touch $@

# promtool (Prometheus's rule checker and unit tester) for deploy/prometheus, from Debian's prometheus package,
# unpacked into .tools: installing the package would also set up and start a Prometheus server.
PROMTOOL := .tools/prometheus/usr/bin/promtool
$(PROMTOOL):
	mkdir -p .tools
	cd .tools && rm -f prometheus_*.deb && (apt-get download -q prometheus 2>/dev/null \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get download -q prometheus; }) \
	  || { echo "promtool is missing: Debian's prometheus package could not be downloaded"; exit 1; }
	cd .tools && dpkg-deb -x prometheus_*.deb prometheus && rm prometheus_*.deb
	touch $@

install: .stamp-install

# Generated code lives in src/mesh/{common,file,image,inference,queue}: one package, with .pyi stubs.
.stamp-proto: .stamp-install $(PROTO_SRC) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	touch $@

proto: .stamp-proto

up: .stamp-proto
	$(PY) -m mesh.tools.up

# Wire and JSON compatibility of protos/ with BASE (buf's FILE rules): a field renumbered, retyped or
# removed breaks every client built from the older files. BASE defaults to the previous commit; a checkout
# without it (a shallow clone) has nothing to compare with.
BASE ?= HEAD~1
breaking: .stamp-npm
	@if git rev-parse -q --verify "$(BASE)^{commit}" >/dev/null; then \
	  node_modules/.bin/buf breaking --against '.git#ref=$(BASE)' && echo "buf breaking: protos/ compatible with $(BASE)"; \
	else echo "buf breaking: no $(BASE) in this checkout; nothing to compare with"; fi

lint: .stamp-proto .stamp-npm
	node_modules/.bin/buf lint
	$(MAKE) --no-print-directory breaking
	$(PY) -m ruff check src tests scripts bench
	$(PY) -m ruff format --check src tests scripts bench
	$(PY) -m mypy

fmt: .stamp-install
	$(PY) -m ruff format src tests scripts bench
	$(PY) -m ruff check --fix src tests scripts bench

test: .stamp-proto .stamp-npm .stamp-chromium $(PROMTOOL)
	$(MAKE) lint
	$(MAKE) k8s-check
	# Two workers (pytest-xdist), then the tests marked serial one after another (one restarts RabbitMQ, the
	# system tests run the whole mesh on fixed ports): on two cores, about half the time of one run.
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not serial"
	$(PY) -m pytest -q -p no:cacheprovider -m serial

bench: .stamp-proto
	$(PY) -m bench

eval: .stamp-proto
	$(PY) -m mesh.services.inference.evaluate

load: .stamp-proto
	$(PY) -m mesh.tools.load

k8s-check: .stamp-proto
	$(PY) -m mesh.tools.k8s_check

clean:
	rm -rf .stamp-* $(VENV) node_modules .tools src/mesh/common src/mesh/file src/mesh/image src/mesh/inference src/mesh/queue
