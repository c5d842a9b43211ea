# The README's two commands: `make demo` and `make test`. Each installs what it needs.
# Needs root (namespaces, bridges, nftables), as netd itself does.

VENV     ?= .venv
PY       := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo bench lint clean-host

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-packages
	scripts/install-system-packages
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m netd.api.launcher $(VENV)/bin/netd
	touch $@

test: install
	$(PY) -m ruff check netd drivers kvstore runtime labs tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m labs demo

bench: install
	$(PY) -m bench

lint: install
	$(PY) -m ruff check netd drivers kvstore runtime labs tests bench

# Remove what a crashed test or lab may have left behind (only netd's own names).
clean-host: install
	$(PY) -m tests.support.cleanup
