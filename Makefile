# The two commands of the README:  make bench  |  make test
# Both create .venv (Python 3.11), install the project and the Fashion-MNIST data when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench test venv data benchmarks clean

bench: $(STAMP) data
	$(PY) -m orchestrator.bench

test: $(STAMP) data
	@bash scripts/ensure_system.sh --with-browser
	$(PY) -m pytest -m "not benchmark" tests

# Slow figures reported in the README (accuracy, throughput); not part of `make test`.
benchmarks: $(STAMP) data
	$(PY) -m pytest -m benchmark tests -s

venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Debian ships the real Fashion-MNIST files; install them when apt is there and they are not.
data:
	@bash scripts/ensure_system.sh

clean:
	rm -rf $(VENV) *.egg-info
