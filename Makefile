# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PY := .venv/bin/python

.PHONY: setup demo test lint runtime bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts

runtime:
	$(MAKE) -C runtime

bench: setup
	$(PY) bench/run.py

clean:
	$(MAKE) -C runtime clean
	rm -rf .venv build *.egg-info src/*.egg-info
