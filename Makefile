# Two entry points, each doing all the set-up on a fresh machine:
#   make bench   LoRA benchmark, fused against unfused, on the best device present
#   make test    the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A torch already installed (e.g. a CUDA build on a GPU machine) is reused through the system
# site-packages; otherwise torch==2.13.0 is installed (the CPU build on CI).
TORCH_PIN ?= torch==2.13.0
MAX_JOBS ?= $(shell nproc)
CONSTRAINTS := -c .ci/constraints.txt

.PHONY: install test bench clean

$(VENV)/.installed: pyproject.toml setup.py .ci/constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e ".[test]"
	$(PY) -c "import lowrank; [print(f'  {n:7s} {\"yes\" if s.available else \"no \"}  {s.reason}') for n, s in lowrank.backends().items()]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m benchmarks.bench_lora --plot

clean:
	rm -rf $(VENV) build *.egg-info lowrank/_C*.so
