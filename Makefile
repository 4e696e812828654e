# Each target sets itself up on a fresh machine: creates .venv when missing, installs torch first (pinned, see
# README), then the project with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xbmd-installed
DEMO ?= demo_out

.PHONY: setup test lint demo clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[cpu,jpeg,dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

clean-demo:
	rm -rf $(DEMO)
