# The README's first commands: `make demo` and `make test`. Both build .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo example test lint typecheck layers bench clean policies-check

venv: $(STAMP)

# CPU torch 2.13.0 first (it lies on this machine's disk); a looser requirement would pull a
# multi-GB CUDA build. Then the package with its extras (vision: torchvision 0.28.0, whose pin
# torch==2.13.0 the CPU build already satisfies, so it pulls no other torch).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vision]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secure-split demo vanilla

# The worked example of peers/: two hospitals and a lab on CSV files, one `peer run` process each;
# checks the policy and each organisation's data, trains, verifies the audit logs, predicts.
example: $(STAMP)
	$(PY) scripts/run_example.py

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check secure_split tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/split_vs_local.py

clean:
	rm -rf $(VENV) build *.egg-info
