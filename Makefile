# Each target sets itself up on a fresh machine: creates .venv when missing, installs torch first (pinned, see
# README), then the project with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xbmd-installed
DEMO ?= demo_out

GPU_PINS_VENV ?= .venv-gpupins

.PHONY: setup test lint demo clean-demo gpu-pins

# The stamps also depend on this Makefile, so a changed extras list below reinstalls an existing .venv.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[cpu,jpeg,dev]'
	touch $(STAMP)

# `make test` (and so CI) also installs the `ray` extra, so tests/test_score_ray.py runs instead of skipping;
# `make demo` does not need it.
RAY_STAMP := $(VENV)/.xbmd-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[ray]'
	touch $(RAY_STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) $(RAY_STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

clean-demo:
	rm -rf $(DEMO)

# The GPU extra's pins (requirements/gpu-pins.txt: onnxruntime-gpu 1.31.1, onnx 1.23.2) in a small venv without
# torch (~1 min, ~300 MB download): the fp16 conversion and IR-version probe under the versions a GPU box gets.
# Runs on CPU. Not part of `make test` (CI stays small); tests/test_onnx_fp16.py runs the same probe there with
# the CI versions, and with these pins when XBMD_GPU_PINS_PYTHON is set.
gpu-pins: $(STAMP)
	test -x $(GPU_PINS_VENV)/bin/python || python3 -m venv $(GPU_PINS_VENV)
	$(GPU_PINS_VENV)/bin/python -m pip install -q -r requirements/gpu-pins.txt
	XBMD_GPU_PINS_PYTHON=$(GPU_PINS_VENV)/bin/python $(PY) -m pytest -q tests/test_onnx_fp16.py -k pins
