# Two entry points, each setting everything up first:
#   make zoo    compile every spec in specs/ to PyTorch and ONNX and verify both at every -O level (the main job)
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup setup-gpu zoo test test-gpu generate check lint bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[torch,onnxruntime,dev]'
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) ; } || \
		echo "note: Graphviz 'dot' is not installed; dnc graph --format svg|png will say so (apt-get install graphviz)"
	touch $@

# On a machine with an NVIDIA GPU: onnxruntime-gpu in place of onnxruntime (the two
# cannot be installed together: both provide the onnxruntime module), then every
# CUDA-marked test for both targets, each skip printed with its reason.
# NOTE: 1.31.1 is the newest onnxruntime-gpu on PyPI (1.32.0, the CPU pin, has no GPU build).
ONNXRUNTIME_GPU ?= onnxruntime-gpu==1.31.1

setup-gpu: setup
	$(BIN)/python -m pip uninstall --quiet --yes onnxruntime
	$(BIN)/python -m pip install --quiet '$(ONNXRUNTIME_GPU)'
	$(BIN)/python -c "import onnxruntime as o; print('onnxruntime providers:', o.get_available_providers())"

test-gpu: setup
	$(BIN)/python -m pytest -m cuda -rs -v

# On a machine with an NVIDIA GPU: -O levels against torchvision (eager and channels_last), timed there.
bench-gpu: setup
	$(BIN)/python benchmarks/opt_levels.py --device cuda --batch 1 --models torchvision torchvision_cl O0 O2
	$(BIN)/python benchmarks/opt_levels.py --device cuda --batch 64 --models torchvision torchvision_cl O0 O2
	$(BIN)/python benchmarks/opt_levels.py --device cuda --batch 64 --dtype float16 --models torchvision torchvision_cl O2

zoo: setup
	$(BIN)/dnc validate specs/*.yaml
	$(BIN)/dnc compile --target torch
	$(BIN)/dnc compile --target onnx
	$(BIN)/dnc verify specs/*.yaml --target torch -O0
	$(BIN)/dnc verify specs/*.yaml --target torch -O1
	$(BIN)/dnc verify specs/*.yaml --target torch -O2
	$(BIN)/dnc verify specs/*.yaml --target onnx -O0
	$(BIN)/dnc verify specs/*.yaml --target onnx -O2

test: setup
	$(BIN)/python -m pytest

generate: setup
	$(BIN)/dnc compile --target torch

lint: setup
	$(BIN)/ruff check dnc tests benchmarks generated
	$(BIN)/ruff format --check dnc tests benchmarks generated

bench: setup
	$(BIN)/python benchmarks/summary_speed.py
	$(BIN)/python benchmarks/compile_speed.py
	$(BIN)/python benchmarks/verifier_cost.py
	$(BIN)/python benchmarks/onnx_vs_torch_export.py --specs densenet121 densenet264
	$(BIN)/python benchmarks/torch_vs_torchvision.py

clean:
	rm -rf $(VENV) build .pytest_cache
