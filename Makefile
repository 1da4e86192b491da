# `make test` and `make demo` work on a fresh machine: they build .venv once (reused when complete).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.ready

.PHONY: venv test demo bench readme clean

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(READY)

venv: $(READY)

test: $(READY)
	$(PY) -m pytest -q tests

demo: $(READY)
	$(VENV)/bin/blendserve plan --requests 20000

bench: $(READY)
	$(PY) bench/tree_scale.py
	$(VENV)/bin/blendserve plan --requests 20000 --out bench/results/plan_replay.json
	$(PY) bench/report.py

readme: $(READY)
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
