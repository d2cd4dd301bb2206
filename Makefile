# Two commands on a fresh clone (Python 3.11 + pip): `make fit` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: fit test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

fit: $(VENV)/.installed  ## install, then fit the default synthetic subject
	$(PY) scripts/fit.py subject=patient1 trainer.devices=1

test: $(VENV)/.installed  ## install, then run the whole test suite (two workers: one per core)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed  ## speed benchmark: writes benchmarks/results/em_speed.json; `python benchmarks/render.py` renders the tables
	$(PY) benchmarks/em_speed.py

clean:
	rm -rf outputs multirun .pytest_cache
