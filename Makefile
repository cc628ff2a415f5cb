# gcvimoe: `make demo` trains a small GCViMoE on the embedded digits; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gcvimoe-installed
DEMO_DIR ?= demo_output

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

# torch and torchvision are pinned and installed first so pip takes them from the local wheel store.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test,export,tensorboard,hf]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m gcvimoe demo --output $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src
	$(BIN)/lint-imports

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/backbone.py
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build dist src/*.egg-info
