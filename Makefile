# The README's two commands. Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pyproject.toml declares compatible ranges; constraints.txt holds the exact versions we test with.
EXTRAS := dev,lm-eval,agents,swe

.PHONY: demo test lint install lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on disk; nothing later may pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# After adding or changing a dependency in pyproject.toml: install it, then record the exact versions.
lock: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	{ echo "# Exact versions loopcoder is tested with (make lock); pyproject.toml has the ranges."; \
	  $(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' | LC_ALL=C sort -f; } > constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loopcoder demo --out runs/study

# The suite starts with the lint: one code style, enforced (ruff check and ruff format --check).
test: lint
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
