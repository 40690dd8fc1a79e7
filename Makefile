# The two commands of the README. Each sets up what it needs first (idempotent).
PY ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(if $(CONDA_PREFIX),$(CONDA_PREFIX)/bin/python,.venv/bin/python))

.PHONY: quickstart test lint setup setup-test

setup:
	@bash scripts/setup.sh run

setup-test:
	@bash scripts/setup.sh test

quickstart: setup
	$(PY) -m tunelab quickstart

test: setup-test
	$(PY) -m ruff check .
	@# the suite must leave `git status` as it found it (empty on a clean clone)
	TUNELAB_REQUIRE_BROWSER=1 TUNELAB_REQUIRE_LLAMA_CPP=1 bash scripts/tree-clean.sh \
		$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: setup-test
	$(PY) -m ruff check .
