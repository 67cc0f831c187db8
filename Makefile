# Two entry points, each doing all the set-up on a fresh machine:
#   make bench   LoRA benchmark, fused against unfused, on the best device present
#   make test    the test suite
# .ci/run calls make lint, make test and make cuda-check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A torch already installed (e.g. a CUDA build on a GPU machine) is reused through the system
# site-packages; otherwise torch==2.13.0 is installed (the CPU build on CI).
TORCH_PIN ?= torch==2.13.0
MAX_JOBS ?= $(shell nproc)
CONSTRAINTS := -c .ci/constraints.txt

# The CUDA build check, for CI and for anyone changing csrc/ or kernels/ without a GPU: a
# separate venv with the CUDA build of torch (from local disk on the dev and CI machines), the
# extension built with LOWRANK_CUDA=1 from a copy of the tree, every native op checked for its
# CUDA kernel, and every Triton kernel compiled for sm_90 with that venv's triton and with the
# test venv's pinned one.
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_CONSTRAINTS := -c .ci/constraints-cuda.txt
CUDA_ARCHS ?= 8.0;9.0+PTX

.PHONY: install test lint bench cuda-check clean

$(VENV)/.installed: pyproject.toml setup.py .ci/constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e ".[test]"
	$(PY) -c "import lowrank; [print(f'  {n:7s} {\"yes\" if s.available else \"no \"}  {s.reason}') for n, s in lowrank.backends().items()]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

lint: install
	$(PIP) install -q $(CONSTRAINTS) ruff
	$(PY) -m ruff check .

bench: install
	$(PY) -m benchmarks.bench_lora_linear --plot

$(CUDA_VENV)/.installed: .ci/constraints-cuda.txt
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q $(CUDA_CONSTRAINTS) --upgrade pip setuptools wheel
	$(CUDA_PY) -m pip install -q $(CUDA_CONSTRAINTS) torch ninja pybind11 numpy safetensors
	$(CUDA_PY) -c "import torch, sys; torch.version.cuda or sys.exit(f'torch {torch.__version__} is not a CUDA build')"
	touch $@

cuda-check: $(CUDA_VENV)/.installed install
	rm -rf $(CUDA_VENV)/src && mkdir $(CUDA_VENV)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(CUDA_VENV)/src
	cd $(CUDA_VENV)/src && start=$$(date +%s) \
	  && LOWRANK_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(MAX_JOBS) \
	     ../bin/python -m pip install -q --no-build-isolation --no-deps . \
	  && echo "CUDA build (LOWRANK_CUDA=1, TORCH_CUDA_ARCH_LIST=$(CUDA_ARCHS), MAX_JOBS=$(MAX_JOBS)): $$(( $$(date +%s) - start )) s"
	$(CUDA_PY) .ci/check_cuda_build.py
	$(CUDA_PY) tests/compile/compile_triton_sm90.py
	$(PY) tests/compile/compile_triton_sm90.py

clean:
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info lowrank/_C*.so
