# The two commands a newcomer needs: `make demo` (the main job) and `make check` (what CI runs).
PY := .venv/bin/python

.PHONY: env check lint test demo bench clean

env:
	@scripts/bootstrap

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

check: lint test

demo: env
	@scripts/demo

bench:
	@scripts/bench

clean:
	rm -rf .venv .venv-bench .mypy_cache .ruff_cache .pytest_cache build *.egg-info
