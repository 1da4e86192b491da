# `make test` and `make demo` work on a fresh machine: they build .venv once (reused when complete):
# CPU torch, SGLang 0.5.23 with its pinned import closure (requirements/cpu.lock, installed without
# dependency resolution so no CUDA wheels are pulled), this package, and the CPU fallback .pth.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.ready
export SGLANG_USE_CPU_ENGINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-core demo plan bench readme clean

$(READY): pyproject.toml requirements/cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet -e '.[test,workloads,ray]'
	$(PY) -m kernels.cpu_fallback install-pth
	touch $(READY)

venv: $(READY)

test: $(READY)
	$(PY) -m pytest -q --durations=30 tests

test-core: $(READY)
	$(PY) -m pytest -q tests -m "not engine"

demo: $(READY)
	$(VENV)/bin/blendserve run examples/requests.jsonl -o results.jsonl --overwrite

plan: $(READY)
	$(VENV)/bin/blendserve plan examples/requests.jsonl --model smollm2-135m --hardware h100

bench: $(READY)
	$(PY) bench/tree_scale.py
	$(PY) bench/plan_file.py
	$(PY) bench/report.py

readme: $(READY)
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
